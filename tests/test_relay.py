"""The blind relay, sans-I/O: tokens bind sessions to members' addresses, only members'
datagrams are forwarded and only to the other member, byte for byte, within the limits; and
introductions hand both sides a relay session through the introducer."""

from __future__ import annotations

import os

from hypothesis import given
from hypothesis import strategies as st

from dhtnode.connect.connector import Introduced, introduce
from dhtnode.connect.listen import Introduction
from dhtnode.connect.peerinfo import PeerInfo
from dhtnode.crypto.identity import Identity
from dhtnode.errors import DecodeError
from dhtnode.nat.relay import IDLE_TIMEOUT, SECRET_ROTATE, RelayLimits, RelayTable
from dhtnode.wire import relay as wire
from tests.test_connect_intro import _network

A = ("198.51.100.1", 4000)
B = ("203.0.113.9", 5000)
EVIL = ("203.0.113.66", 6666)


def _paired(table: RelayTable, now: float = 0.0) -> bytes:
    sid = table.new_session_id()
    for role, addr in ((0, A), (1, B)):
        tok = table.mint(sid, role, addr, now)
        out = table.receive(wire.encode_bind(wire.Bind(role, sid, tok)), addr, now)
        assert out and out[0][1] == addr
    return sid


def test_pairing_and_forwarding() -> None:
    t = RelayTable(RelayLimits(), os.urandom, 0.0)
    sid = _paired(t)
    payload = os.urandom(1200)
    out = t.receive(wire.encode_data(wire.RelayType.DATA_TO_RELAY, sid, payload), A, 1.0)
    assert out == [(wire.encode_data(wire.RelayType.DATA_FROM_RELAY, sid, payload), B)]
    back = t.receive(wire.encode_data(wire.RelayType.DATA_TO_RELAY, sid, b"x"), B, 1.0)
    assert back[0][1] == A and len(back[0][0]) == wire.DATA_HEADER_LEN + 1
    # A stranger cannot inject, nor redirect by binding with someone else's token.
    assert t.receive(wire.encode_data(wire.RelayType.DATA_TO_RELAY, sid, b"evil"), EVIL, 1) == []
    tok_a = t.mint(sid, 0, A, 1.0)
    assert t.receive(wire.encode_bind(wire.Bind(0, sid, tok_a)), EVIL, 1.0) == []
    assert t.stats["drop_relay_stranger"] == 1 and t.stats["drop_relay_bad_token"] == 1


def test_heartbeat_binds_are_answered_after_the_secret_rotated() -> None:
    """A bound member's later BINDs are relaypath.py's liveness heartbeats: answered with
    BOUND even once its token's secret has rotated out; a stranger's still are not."""
    t = RelayTable(RelayLimits(), os.urandom, 0.0)
    sid = _paired(t)
    stale = t.mint(sid, 0, A, 0.0)
    later = 3 * SECRET_ROTATE  # two rotations: the minting secret is gone
    keep = wire.encode_data(wire.RelayType.DATA_TO_RELAY, sid, b"k")
    for now in range(0, int(later) + 1, int(IDLE_TIMEOUT / 2)):  # traffic keeps it alive
        t.receive(keep, A, float(now))
        t.tick(float(now))
    out = t.receive(wire.encode_bind(wire.Bind(0, sid, stale)), A, later)
    assert out == [(wire.encode_bound(wire.Bound(0, sid, True)), A)]
    assert t.receive(wire.encode_bind(wire.Bind(0, sid, stale)), EVIL, later) == []


def test_bound_is_never_bigger_than_bind() -> None:
    t = RelayTable(RelayLimits(), os.urandom, 0.0)
    sid = t.new_session_id()
    bind = wire.encode_bind(wire.Bind(0, sid, t.mint(sid, 0, A, 0.0)))
    out = t.receive(bind, A, 0.0)
    assert all(len(d) <= len(bind) for d, _ in out)


def test_limits() -> None:
    lim = RelayLimits(max_sessions=3, max_sessions_per_ip=2, session_rate=10_000.0)
    t = RelayTable(lim, os.urandom, 0.0)
    sid = _paired(t)
    sent = 0
    for _ in range(100):  # 100 x 1209 bytes at once: only one second's budget passes
        sent += len(t.receive(wire.encode_data(wire.RelayType.DATA_TO_RELAY, sid,
                                               bytes(1200)), A, 0.5))
    assert sent <= 10_000 // 1209 + 1 and t.stats["drop_relay_rate"] > 80
    # A's IP already holds one session; a second is allowed, a third is not.
    for _ in range(3):
        s2 = t.new_session_id()
        t.receive(wire.encode_bind(wire.Bind(0, s2, t.mint(s2, 0, A, 1.0))), A, 1.0)
    assert len(t) == 2 and t.stats["drop_relay_ip_full"] >= 1
    # Idle sessions go.
    t.tick(1.0 + IDLE_TIMEOUT + 1)
    assert len(t) == 0


@given(st.binary(max_size=64))
def test_decoders_raise_only_their_error(data: bytes) -> None:
    for fn in (wire.decode_bind, wire.decode_bound, wire.split_data):
        try:
            fn(data)
        except DecodeError:
            pass
    t = RelayTable(RelayLimits(), os.urandom, 0.0)
    t.receive(bytes([0x30]) + data, A, 0.0)
    t.receive(bytes([0x32]) + data, A, 0.0)


def test_introductions_carry_a_relay_session() -> None:
    net, hosts, services = _network()
    server, client = hosts[-1], hosts[-2]  # behind filtering NATs; introducers serve
    key = Identity.generate()
    intros: list[Introduction] = []
    listeners = services[server.addr].listeners
    net.act(server, lambda n: listeners.listen(key, intros.append))
    net.run_until(net.now + 5)
    op = net.run_op(client, lambda n: introduce(n, Identity.generate(), key.public_key,
                                                 PeerInfo()), 10)
    res = op.result()
    assert isinstance(res, Introduced) and res.relay is not None
    assert intros[0].relay is not None
    assert res.relay.session == intros[0].relay.session
    assert res.relay.relay == intros[0].relay.relay == res.introducer
    # Both bind through their own node socket; the relay pairs them and forwards.
    got: dict[str, list[bytes]] = {"client": [], "server": []}
    services[client.addr].relay.member_sink = lambda d, s: got["client"].append(d)
    services[server.addr].relay.member_sink = lambda d, s: got["server"].append(d)
    for host, offer, role in ((client, res.relay, 0), (server, intros[0].relay, 1)):
        bind = wire.encode_bind(wire.Bind(role, offer.session, offer.token))
        net.act(host, lambda n, b=bind, o=offer: n.ctx.send(b, o.relay))
    net.run_until(net.now + 1)
    assert any(wire.decode_bound(d).paired for d in got["client"] if d[0] == 0x31)
    data = wire.encode_data(wire.RelayType.DATA_TO_RELAY, res.relay.session, b"quic bytes")
    net.act(client, lambda n: n.ctx.send(data, res.relay.relay))  # type: ignore[union-attr]
    net.run_until(net.now + 1)
    assert any(d == bytes([0x33]) + data[1:] for d in got["server"])
