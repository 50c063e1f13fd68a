"""Introductions through DHT nodes, in the simulator: a listener behind a filtering NAT is
found by key, the sealed hello and reply pass through an introducer that sees only
ciphertext, refusals are sealed answers, unknown keys fail fast, tampered and replayed hellos
are dropped and make nobody send to the address they name."""

from __future__ import annotations

from dhtnode.connect.connector import (
    ConnectRefused,
    Introduced,
    PeerNotFound,
    introduce,
)
from dhtnode.connect.listen import Introduction
from dhtnode.connect.peerinfo import PeerInfo
from dhtnode.connect.services import ConnectServices, plug_in
from dhtnode.crypto.identity import Identity
from dhtnode.dht.ids import listen_topic
from dhtnode.sim.network import SimHost, SimNetwork
from dhtnode.wire import messages as m

Services = dict[tuple[str, int], ConnectServices]


def _network(n: int = 25) -> tuple[SimNetwork, list[SimHost], Services]:
    net = SimNetwork(seed=7)
    services: Services = {}
    first = net.add_node(bootstrap_node=True)
    services[first.addr] = plug_in(first.node)
    hosts = [first]
    for i in range(n):
        h = net.add_node(seeds=(first.addr,), firewalled=i >= n - 3)
        services[h.addr] = plug_in(h.node)
        net.start(h, lambda node: node.bootstrap())
        hosts.append(h)
    net.run_until(net.now + 60)
    return net, hosts, services


def test_introduction_through_a_dht_node() -> None:
    net, hosts, services = _network()
    server, client = hosts[-1], hosts[-2]  # both firewalled (behind filtering NATs)
    assert not server.node.server and not client.node.server
    key = Identity.generate()
    intros: list[Introduction] = []
    listeners = services[server.addr].listeners
    _, first = net.act(server, lambda n: listeners.listen(key, intros.append))
    net.run_until(net.now + 5)
    assert first.done and first.result() >= 3

    # Capture what the introducer forwards.
    wire: list[bytes] = []
    for h in hosts:
        orig = h.node.datagrams_to_send

        def spy(orig=orig):  # type: ignore[no-untyped-def]
            out = orig()
            wire.extend(d for d, _ in out)
            return out

        h.node.datagrams_to_send = spy  # type: ignore[method-assign]

    client_id = Identity.generate()
    info = PeerInfo(nat_class="consistent", public_addresses=(client.addr,))
    op = net.run_op(client, lambda n: introduce(n, client_id, key.public_key, info), 10)
    res = op.result()
    assert isinstance(res, Introduced)
    assert res.server_address == server.addr
    assert res.handshake.punch_key and len(intros) == 1
    intro = intros[0]
    assert intro.client_address == client.addr
    assert intro.handshake.client_key == client_id.public_key
    assert intro.handshake.punch_key == res.handshake.punch_key
    assert intro.client_info == info
    # Nothing on the wire carries the client's key or its announced payload in clear.
    forwards = [d for d in wire if d[0] == 0x10 and d[3] == m.Command.INTRO_FORWARD]
    assert forwards
    assert not any(client_id.public_key in d for d in wire)
    assert not any(info.encode() in d for d in wire)

    # A second connect from the same client is a new introduction (no global throttle).
    op2 = net.run_op(client, lambda n: introduce(n, client_id, key.public_key, info), 10)
    assert isinstance(op2.result(), Introduced) and len(intros) == 2


def test_refused_and_not_found() -> None:
    net, hosts, services = _network()
    server, client = hosts[-1], hosts[5]
    key = Identity.generate()
    allowed = Identity.generate()
    intros: list[Introduction] = []
    listeners = services[server.addr].listeners
    net.act(server, lambda n: listeners.listen(
        key, intros.append, allow=lambda k: k == allowed.public_key
    ))
    net.run_until(net.now + 5)
    info = PeerInfo()
    op = net.run_op(client, lambda n: introduce(n, Identity.generate(), key.public_key, info), 10)
    assert isinstance(op.error, ConnectRefused)
    assert not intros
    op = net.run_op(client, lambda n: introduce(n, allowed, key.public_key, info), 10)
    assert isinstance(op.result(), Introduced)

    start = net.now
    nobody = Identity.generate().public_key
    op = net.run_op(client, lambda n: introduce(n, allowed, nobody, info), 30)
    assert isinstance(op.error, PeerNotFound)
    assert net.now - start < 5.0


def test_forged_and_replayed_hellos_start_nothing() -> None:
    net, hosts, services = _network()
    server, client, attacker = hosts[-1], hosts[3], hosts[4]
    key = Identity.generate()
    intros: list[Introduction] = []
    listeners = services[server.addr].listeners
    net.act(server, lambda n: listeners.listen(key, intros.append))
    net.run_until(net.now + 5)
    hellos: list[tuple[bytes, tuple[str, int], bytes | None]] = []
    orig = server.node.rpc.receive

    def tap(msg: m.Request | m.Response, source: tuple[str, int]) -> None:
        if isinstance(msg, m.Request) and msg.command is m.Command.INTRO_FORWARD:
            hellos.append((msg.value or b"", source, msg.token))
        orig(msg, source)

    server.node.rpc.receive = tap  # type: ignore[method-assign]
    op = net.run_op(client, lambda n: introduce(n, Identity.generate(), key.public_key,
                                                 PeerInfo()), 10)
    assert op.done and op.error is None
    assert len(intros) == 1
    # The introducer proved its address with the listener's token (after one error 2).
    body, introducer, token = next(h for h in hellos if h[2] is not None)
    stats = server.node.stats
    # Forged in the introducer's name (anyone can read who it is in the record), without its
    # proof of address: refused before the hello is opened.
    unproven = stats["drop_intro_unproven"]
    data = m.encode_request(m.Request(
        m.Command.INTRO_FORWARD, 76, None, listen_topic(key.public_key), None, body
    ))
    net.act(server, lambda n: n.receive(data, introducer, net.now))
    assert stats["drop_intro_unproven"] == unproven + 1
    assert stats["hello_duplicate"] == 0
    # Replayed by the introducer, and tampered: no new introduction, nothing started.
    for value in (body, body[:-1] + bytes([body[-1] ^ 1])):
        data = m.encode_request(m.Request(
            m.Command.INTRO_FORWARD, 77, None, listen_topic(key.public_key), token, value
        ))
        net.act(server, lambda n, data=data: n.receive(data, introducer, net.now))
        net.run_until(net.now + 1)
    assert len(intros) == 1
    assert stats["hello_duplicate"] >= 1
    # A changed copy reuses an accepted ephemeral key: refused before any crypto.
    assert stats["drop_hello_replayed"] + stats["drop_hello_tampered"] == 1
    # From a node the listener never sent to: dropped unread.
    req = m.Request(m.Command.INTRO_FORWARD, 78, None, listen_topic(key.public_key), None, body)
    server.node.receive(m.encode_request(req), ("203.0.113.250", 9), net.now)
    assert stats["drop_intro_stranger"] == 1
    # An INTRODUCE without a valid token is refused by the introducer before forwarding.
    intro_node = next(h for h in hosts if h.addr == introducer)
    before = intro_node.node.stats["introduce_forwarded"]
    bad = m.Request(m.Command.INTRODUCE, 5, None, listen_topic(key.public_key), b"x" * 16,
                    body)
    intro_node.node.receive(m.encode_request(bad), attacker.addr, net.now)
    assert intro_node.node.stats["drop_bad_token"] >= 1
    assert intro_node.node.stats["introduce_forwarded"] == before


def test_spoofed_introduce_sends_nothing_to_the_victim() -> None:
    """An attacker with its own valid token forges INTRODUCEs whose source is a victim: the
    token does not match the victim's address, so no listener is asked and nobody probes the
    victim; the victim gets at most the small error answers (smaller than the requests)."""
    net, hosts, services = _network()
    server, attacker = hosts[-1], hosts[4]
    victim = ("198.51.100.77", 4444)
    key = Identity.generate()
    listeners = services[server.addr].listeners
    net.act(server, lambda n: listeners.listen(key, lambda i: None))
    net.run_until(net.now + 5)
    topic = listen_topic(key.public_key)
    res = net.run_op(attacker, lambda n: n.lookup(topic), 10).result()
    rec = next(r for r in res.records if r.public_key == key.public_key)
    intro_addrs = [a for kind, a in rec.addresses
                   if kind.name == "INTRODUCER" and a in res.tokens]
    assert intro_addrs
    to_victim: list[bytes] = []
    for h in hosts:
        orig = h.node.datagrams_to_send

        def spy(orig=orig):  # type: ignore[no-untyped-def]
            out = orig()
            to_victim.extend(d for d, a in out if a == victim)
            return out

        h.node.datagrams_to_send = spy  # type: ignore[method-assign]
    hello = b"\x01" + bytes(400)
    sent = 0
    for via in intro_addrs:
        token = res.tokens[via]
        for tid in range(20):
            req = m.Request(m.Command.INTRODUCE, tid, None, topic, token, hello)
            data = m.encode_request(req)
            host = next(h for h in hosts if h.addr == via)
            net.act(host, lambda n, data=data: n.receive(data, victim, net.now))
            sent += len(data)
    net.run_until(net.now + 15)
    assert server.node.stats["hello_accepted"] == 0
    assert not any(d[0] == 0x20 for d in to_victim)  # no punch probe
    assert len(to_victim) <= 20 * len(intro_addrs)  # one small error answer per request
    assert sum(len(d) for d in to_victim) < sent / 5


def test_listener_keeps_introducers_and_replaces_lost_ones() -> None:
    net, hosts, services = _network()
    server, client = hosts[-1], hosts[6]
    key = Identity.generate()
    listeners = services[server.addr].listeners
    lst, _ = net.act(server, lambda n: listeners.listen(key, lambda i: None))
    net.run_until(net.now + 5)
    first = list(lst.introducers)
    assert len(first) == 3
    # The client must not be one of the introducers killed below (the key is random, so the
    # introducers are too: hosts[6] was one in about one run of twelve).
    client = next(h for h in hosts[1:-3] if h.addr not in first[:2])
    # Keep-alives: the listener talks to each introducer at least every 20 s.
    pings_before = server.node.stats["tx"]
    net.run_until(net.now + 45)
    assert server.node.stats["tx"] - pings_before >= 2 * len(first)
    # Two introducers die: the listener notices at its next keep-alive and names others.
    for addr in first[:2]:
        net.kill(addr)
    net.run_until(net.now + 30)
    assert set(lst.introducers) - set(first), lst.introducers
    assert not set(lst.introducers) & set(first[:2])
    op = net.run_op(client, lambda n: introduce(n, Identity.generate(), key.public_key,
                                                 PeerInfo()), 15)
    assert isinstance(op.result(), Introduced)
