"""The sealed introduction (hello/reply through a forwarder) and the PeerInfo payload codec."""

from __future__ import annotations

import os
import struct
import time
from ipaddress import IPv4Address, IPv6Address

import nacl.bindings
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dhtnode.connect import handshake as hs_module
from dhtnode.connect.handshake import (
    ATTEMPT_ID_LEN,
    HELLO_OVERHEAD,
    HELLO_TAG,
    HELLO_WINDOW,
    MAX_PAYLOAD,
    REPLY_OVERHEAD,
    ClientHandshake,
    HandshakeError,
    ReplayGuard,
    open_hello,
    seal_hello,
)
from dhtnode.connect.peerinfo import MAX_ENCODED_LEN, PeerInfo, PeerInfoError
from dhtnode.crypto.identity import Identity
from dhtnode.errors import DhtnodeError
from dhtnode.wire import address as wire_address
from dhtnode.wire.address import Address

WALL = 1_800_000_000.0
CLIENT = Identity.from_seed(b"\x01" * 32)
SERVER = Identity.from_seed(b"\x02" * 32)
OTHER = Identity.from_seed(b"\x03" * 32)

INFO = PeerInfo(
    nat_class="random",
    open=False,
    port_samples=(40001, 40007, 52113),
    public_addresses=(("203.0.113.9", 4000), ("2001:db8::5", 4001)),
    lan_addresses=(("192.168.1.20", 4000),),
    flags=0,
)
SERVER_INFO = PeerInfo(
    nat_class="consistent", open=True, public_addresses=(("198.51.100.7", 9000),)
)
#: The largest PeerInfo: what the datagram budget must hold.
BIG_INFO = PeerInfo(
    nat_class="random",
    port_samples=tuple(range(1000, 1016)),
    public_addresses=tuple((f"2001:db8::{i + 1}", 5000 + i) for i in range(4)),
    lan_addresses=tuple((f"fd00::{i + 1}", 6000 + i) for i in range(4)),
)


def hello(
    payload: bytes = INFO.encode(), *, wall: float = WALL, server: Identity = SERVER
) -> tuple[bytes, ClientHandshake]:
    return seal_hello(CLIENT, server.public_key, payload, wall=wall)


def test_round_trip_and_shared_values() -> None:
    raw, client = hello()
    assert len(raw) == HELLO_OVERHEAD + len(INFO.encode())
    server = open_hello(SERVER, raw, wall=WALL + 1.5, guard=ReplayGuard())
    assert server.client_key == CLIENT.public_key
    assert PeerInfo.decode(server.payload) == INFO
    assert not server.duplicate and server.previous_reply is None
    assert server.timestamp == WALL
    assert server.punch_key == client.punch_key and len(client.punch_key) == 32
    assert server.attempt_id == client.attempt_id and len(client.attempt_id) == ATTEMPT_ID_LEN
    assert client.server_key == SERVER.public_key

    reply = server.seal_reply(accepted=True, payload=SERVER_INFO.encode())
    assert len(reply) == REPLY_OVERHEAD + len(SERVER_INFO.encode())
    got = client.open_reply(reply)
    assert got.accepted and got.reason == 0 and PeerInfo.decode(got.payload) == SERVER_INFO

    refused = client.open_reply(server.seal_reply(accepted=False, payload=b"", reason=7))
    assert not refused.accepted and refused.reason == 7 and refused.payload == b""


def test_every_attempt_has_fresh_keys() -> None:
    _, a = hello()
    _, b = hello()
    assert a.punch_key != b.punch_key and a.attempt_id != b.attempt_id
    assert len({a.punch_key, a.attempt_id, a._reply_key}) == 3  # direction/purpose separated


def test_sizes_fit_one_datagram() -> None:
    assert HELLO_OVERHEAD == 177 and REPLY_OVERHEAD == 43
    biggest = BIG_INFO.encode()
    assert len(biggest) == MAX_ENCODED_LEN == 190
    raw, client = hello(biggest)
    server = open_hello(SERVER, raw, wall=WALL, guard=ReplayGuard())
    reply = server.seal_reply(accepted=True, payload=biggest)
    # ~100 bytes of DHT framing around either must stay within a 1200-byte datagram.
    assert len(raw) + 100 <= 1200 and len(reply) + 100 <= 1200
    assert HELLO_OVERHEAD + MAX_PAYLOAD + 100 <= 1200
    assert PeerInfo.decode(client.open_reply(reply).payload) == BIG_INFO
    with pytest.raises(ValueError):
        hello(b"x" * (MAX_PAYLOAD + 1))


def test_forwarder_sees_no_identity_or_addresses() -> None:
    raw, client = hello()
    server = open_hello(SERVER, raw, wall=WALL, guard=ReplayGuard())
    reply = server.seal_reply(accepted=True, payload=SERVER_INFO.encode())
    secrets = [CLIENT.public_key, client.punch_key, client.attempt_id]
    for info in (INFO, SERVER_INFO):
        for addr in info.public_addresses + info.lan_addresses:
            ip = wire_address.encode(addr)[1:-2]
            secrets += [wire_address.encode(addr), ip, addr[0].encode()]
    for view in (raw, reply):
        for secret in secrets:
            assert secret not in view
    assert b"\x9c\x41" not in raw  # port sample 40001 does not show either


def test_hello_for_another_server_is_rejected() -> None:
    raw, _ = hello(server=OTHER)
    with pytest.raises(HandshakeError, match="tampered or not for this key") as info:
        open_hello(SERVER, raw, wall=WALL, guard=ReplayGuard())
    assert info.value.kind == "tampered"


@pytest.mark.parametrize("skew", [HELLO_WINDOW + 0.001, -HELLO_WINDOW - 0.001, 3600.0])
def test_expired_and_future_hellos_are_rejected(skew: float) -> None:
    raw, _ = hello(wall=WALL - skew)
    with pytest.raises(HandshakeError, match=r"expired \(clock skew > 60 s\?\)"):
        open_hello(SERVER, raw, wall=WALL, guard=ReplayGuard())


@pytest.mark.parametrize("skew", [HELLO_WINDOW, -HELLO_WINDOW, 0.0])
def test_edges_of_the_window_are_accepted(skew: float) -> None:
    raw, _ = hello(wall=WALL - skew)
    open_hello(SERVER, raw, wall=WALL, guard=ReplayGuard())


def test_duplicate_is_flagged_and_replay_rejected() -> None:
    guard = ReplayGuard()
    raw, client = hello()
    first = open_hello(SERVER, raw, wall=WALL, guard=guard)
    # The same bytes again before the first is answered: duplicate, nothing to resend yet.
    again = open_hello(SERVER, raw, wall=WALL + 1, guard=guard)
    assert again.duplicate and again.previous_reply is None
    assert again.attempt_id == first.attempt_id and again.client_key == CLIENT.public_key
    reply = first.seal_reply(accepted=True, payload=b"ok")
    third = open_hello(SERVER, raw, wall=WALL + 2, guard=guard)
    assert third.duplicate and third.previous_reply == reply
    assert client.open_reply(third.previous_reply).payload == b"ok"
    # The same ephemeral key with other bytes (a re-sealed or altered copy) is a replay.
    altered = raw[:-1] + bytes((raw[-1] ^ 1,))
    with pytest.raises(HandshakeError, match="replayed") as info:
        open_hello(SERVER, altered, wall=WALL, guard=guard)
    assert info.value.kind == "replayed"
    assert len(guard) == 1


def test_guard_forgets_only_after_the_window() -> None:
    guard = ReplayGuard(window=10.0)
    raw, _ = hello()
    open_hello(SERVER, raw, wall=WALL, guard=guard)
    other, _ = hello(wall=WALL + 10.0)
    open_hello(SERVER, other, wall=WALL + 10.0, guard=guard)  # expiry runs; raw still live
    assert len(guard) == 2 and open_hello(SERVER, raw, wall=WALL + 10, guard=guard).duplicate
    late, _ = hello(wall=WALL + 10.5)
    open_hello(SERVER, late, wall=WALL + 10.5, guard=guard)
    assert len(guard) == 2  # raw's entry went when its hello stopped passing the time check
    with pytest.raises(HandshakeError, match="expired"):
        open_hello(SERVER, raw, wall=WALL + 10.5, guard=guard)


def test_full_guard_refuses_what_it_might_have_forgotten() -> None:
    guard = ReplayGuard(window=60.0, max_entries=4)
    raws = [hello(wall=WALL + i)[0] for i in range(6)]
    for raw in raws[:4]:
        open_hello(SERVER, raw, wall=WALL + 5, guard=guard)
    open_hello(SERVER, raws[5], wall=WALL + 5, guard=guard)  # evicts raws[0] (oldest ts)
    assert len(guard) == 4
    # raws[0] is no longer remembered, so a replay of it must be refused another way.
    with pytest.raises(HandshakeError) as info:
        open_hello(SERVER, raws[0], wall=WALL + 5, guard=guard)
    assert info.value.kind == "busy"
    open_hello(SERVER, raws[4], wall=WALL + 5, guard=guard)  # newer than the floor: fine
    assert len(guard) == 4


def test_every_flipped_byte_of_a_hello_is_rejected() -> None:
    raw, _ = hello()
    open_hello(SERVER, raw, wall=WALL, guard=ReplayGuard())
    for i in range(len(raw)):
        for bit in (0x01, 0x80):
            bad = bytearray(raw)
            bad[i] ^= bit
            with pytest.raises(HandshakeError):
                open_hello(SERVER, bytes(bad), wall=WALL, guard=ReplayGuard())


def test_every_flipped_byte_of_a_reply_is_rejected() -> None:
    raw, client = hello()
    reply = open_hello(SERVER, raw, wall=WALL, guard=ReplayGuard()).seal_reply(
        accepted=True, payload=SERVER_INFO.encode()
    )
    client.open_reply(reply)
    for i in range(len(reply)):
        for bit in (0x01, 0x80):
            bad = bytearray(reply)
            bad[i] ^= bit
            with pytest.raises(HandshakeError):
                client.open_reply(bytes(bad))
    for cut in (0, 1, REPLY_OVERHEAD - 1, len(reply) - 1):
        with pytest.raises(HandshakeError, match=r"malformed|tampered"):
            client.open_reply(reply[:cut])


def test_reply_for_another_hello_or_from_a_wrong_key_is_rejected() -> None:
    guard = ReplayGuard()
    raw_a, client_a = hello()
    raw_b, _ = hello()
    reply_b = open_hello(SERVER, raw_b, wall=WALL, guard=guard).seal_reply(
        accepted=True, payload=b"b"
    )
    with pytest.raises(HandshakeError, match="tampered"):
        client_a.open_reply(reply_b)
    # An impostor holding another key answers a hello it can open (one sealed for it).
    raw_c, _ = seal_hello(CLIENT, OTHER.public_key, INFO.encode(), wall=WALL)
    impostor = open_hello(OTHER, raw_c, wall=WALL, guard=guard)
    with pytest.raises(HandshakeError, match="tampered"):
        client_a.open_reply(impostor.seal_reply(accepted=True, payload=b"evil"))
    # ... and it cannot open the genuine hello at all.
    with pytest.raises(HandshakeError, match="tampered"):
        open_hello(OTHER, raw_a, wall=WALL, guard=guard)


def craft_hello(
    *, signer: Identity = CLIENT, signed_for: bytes = SERVER.public_key, payload: bytes = b"p"
) -> bytes:
    """A hello sealed correctly for SERVER whose signature may be wrong (the forwarder cannot
    make one of these; a client that knows S can)."""
    e_secret = os.urandom(32)
    e_pub = nacl.bindings.crypto_scalarmult_base(e_secret)
    server_x = nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(SERVER.public_key)
    s = nacl.bindings.crypto_scalarmult(e_secret, server_x)
    ts = struct.pack(">Q", int(WALL * 1000))
    signed = HELLO_TAG + e_pub + signed_for + CLIENT.public_key + ts + payload
    sealed = CLIENT.public_key + ts + signer.sign(signed) + payload
    nonce = os.urandom(24)
    key = hs_module._kdf(s, hs_module._PERSON_HELLO, e_pub + SERVER.public_key)
    return b"\x01" + e_pub + nonce + nacl.bindings.crypto_secretbox(sealed, nonce, key)


def test_signature_is_checked_and_binds_the_server_key() -> None:
    assert open_hello(SERVER, craft_hello(), wall=WALL, guard=ReplayGuard()).payload == b"p"
    for raw in (craft_hello(signer=OTHER), craft_hello(signed_for=OTHER.public_key)):
        with pytest.raises(HandshakeError, match="bad signature") as info:
            open_hello(SERVER, raw, wall=WALL, guard=ReplayGuard())
        assert info.value.kind == "bad_signature"


def test_low_order_ephemeral_key_is_rejected() -> None:
    raw, _ = hello()
    for point in (b"\x00" * 32, b"\x01" + b"\x00" * 31):
        with pytest.raises(HandshakeError, match="tampered"):
            open_hello(SERVER, raw[:1] + point + raw[33:], wall=WALL, guard=ReplayGuard())


def test_bad_server_key_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        seal_hello(CLIENT, b"\x00" * 31, b"", wall=WALL)


@given(st.binary(max_size=1200))
def test_open_hello_raises_only_handshake_error(data: bytes) -> None:
    try:
        open_hello(SERVER, data, wall=WALL, guard=ReplayGuard())
    except HandshakeError:
        pass


@given(st.binary(min_size=HELLO_OVERHEAD, max_size=HELLO_OVERHEAD + 64))
def test_open_hello_of_plausible_garbage(data: bytes) -> None:
    data = b"\x01" + data[1:]  # past the version check, into the crypto
    with pytest.raises(HandshakeError):
        open_hello(SERVER, data, wall=WALL, guard=ReplayGuard())


_CLIENT_STATE = hello()[1]


@given(st.binary(max_size=1200))
def test_open_reply_raises_only_handshake_error(data: bytes) -> None:
    try:
        _CLIENT_STATE.open_reply(data)
    except HandshakeError:
        pass


@given(st.binary(max_size=300))
def test_peerinfo_decode_raises_only_its_error(data: bytes) -> None:
    try:
        info = PeerInfo.decode(data)
    except PeerInfoError:
        return
    assert info.encode() == data  # whatever parses is canonical


_addr4 = st.tuples(st.ip_addresses(v=4).map(str), st.integers(min_value=1, max_value=65535))


def _not_v4_mapped(ip: IPv4Address | IPv6Address) -> bool:
    return not isinstance(ip, IPv6Address) or ip.ipv4_mapped is None  # those decode as IPv4


_addr6 = st.tuples(
    st.ip_addresses(v=6).filter(_not_v4_mapped).map(str),
    st.integers(min_value=1, max_value=65535),
)
_addrs = st.lists(st.one_of(_addr4, _addr6), max_size=4).map(tuple)


@given(
    st.sampled_from(["unknown", "consistent", "random"]),
    st.booleans(),
    st.lists(st.integers(min_value=1, max_value=65535), max_size=16).map(tuple),
    _addrs,
    _addrs,
    st.integers(min_value=0, max_value=255),
)
def test_peerinfo_round_trips(
    nat: str,
    is_open: bool,
    ports: tuple[int, ...],
    pub: tuple[Address, ...],
    lan: tuple[Address, ...],
    flags: int,
) -> None:
    info = PeerInfo(nat, is_open, ports, pub, lan, flags)
    raw = info.encode()
    assert len(raw) <= MAX_ENCODED_LEN
    assert PeerInfo.decode(raw) == info


def test_peerinfo_bounds() -> None:
    with pytest.raises(ValueError):
        PeerInfo(port_samples=tuple(range(1, 18)))
    with pytest.raises(ValueError):
        PeerInfo(public_addresses=(("192.0.2.1", 1),) * 5)
    with pytest.raises(ValueError):
        PeerInfo(nat_class="symmetric")
    raw = bytearray(INFO.encode())
    raw[3] = 17  # port-sample count beyond the bound
    with pytest.raises(PeerInfoError, match="at most 16"):
        PeerInfo.decode(bytes(raw))
    with pytest.raises(PeerInfoError, match="trailing"):
        PeerInfo.decode(INFO.encode() + b"\x00")
    assert PeerInfo.decode(PeerInfo().encode()) == PeerInfo()


def test_errors_are_package_errors() -> None:
    assert issubclass(HandshakeError, DhtnodeError)
    assert issubclass(PeerInfoError, DhtnodeError)


def test_server_open_rate() -> None:
    """Not a pass/fail bound: prints how many hellos per second one core opens."""
    count = 300
    guard = ReplayGuard(max_entries=count)
    raws = [hello()[0] for _ in range(count)]
    start = time.perf_counter()
    for raw in raws:
        open_hello(SERVER, raw, wall=WALL, guard=guard).seal_reply(accepted=True, payload=b"")
    elapsed = time.perf_counter() - start
    print(f"\nhandshake: server opens+answers {count / elapsed:,.0f} hellos/s on one core")
