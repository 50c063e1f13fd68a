"""Item 2 of the hardening issue: no request turns a node into an amplifier, and no request
makes it send to an address that did not ask.

Every request type arrives at a serving node (contacts of both families in its table, a busy
topic of 32 records, a listener with its introducers, the connect services plugged in) from a
forged source that has proven nothing. Everything the node sends because of it, to the source
or anywhere else, is counted on the wire (IP and UDP headers included: 28 bytes IPv4, 48
IPv6), over the next 3 s. A forged INTRO_FORWARD that is accepted starts a punch toward the
address it names: that counts as the punch plan's bound (``PunchPlan.send_cap``) of 31-byte
probes. The test prints the table, then checks: at most 3x for DHT requests (QUIC's limit
before address validation, RFC 9000 section 8.1), 1.5x for STUN, nothing sent elsewhere.

The worst case an attacker can arrange is measured: helpers planted with forged requests
before a CHECK_REACHABLE; a FORWARD_PROBE forged in the name of a node the victim deals with;
an INTRO_FORWARD forged in the name of the listener's introducer (public in its record);
relay BIND and DATA from a forged source that carry a real, paired session of the attacker's.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from dhtnode.connect.handshake import seal_hello
from dhtnode.connect.listen import Introduction
from dhtnode.connect.peerinfo import PeerInfo
from dhtnode.connect.services import plug_in
from dhtnode.crypto.identity import Identity
from dhtnode.dht.ids import listen_topic, node_id_for, topic_from_name
from dhtnode.dht.node import DhtNode, DhtParams
from dhtnode.dht.records import AddressKind, sign_record, sign_withdrawal
from dhtnode.nat.observer import NatClass
from dhtnode.nat.punch import PunchPlan
from dhtnode.nat.strategy import NatProfile
from dhtnode.wire import address as wire_address
from dhtnode.wire import messages as m
from dhtnode.wire import relay as wire_relay
from dhtnode.wire import stun
from dhtnode.wire.address import Address

try:  # the relay offer block between the client address and the hello (relay issue)
    from dhtnode.connect.relay import encode_offer

    NO_OFFER = encode_offer(None, None)
except ImportError:  # pragma: no cover - before the relay
    NO_OFFER = b""

#: The node under attack: a public, serving node.
NODE = ("198.51.100.1", 4000)
EPOCH = 1_800_000_000.0
#: Forged sources (the victims of reflection), and third parties named inside requests.
VICTIM = {4: ("192.0.2.66", 4444), 6: ("2001:db8:66::1", 4444)}
THIRD = {4: ("192.0.2.77", 7777), 6: ("2001:db8:77::1", 7777)}
#: Addresses an attacker plants as "recent requesters" with forged PINGs.
PLANTED = {
    4: [("192.0.2.81", 8001), ("192.0.2.82", 8002)],
    6: [("2001:db8:81::1", 8001), ("2001:db8:82::1", 8002)],
}
#: Seconds after the request during which everything the node sends is counted.
WINDOW = 3.0
#: Limits (wire bytes out per wire byte in).
DHT_LIMIT = 3.0
STUN_LIMIT = 1.5
PUNCH_PROBE = 31


def wire(data: bytes, addr: Address) -> int:
    return len(data) + (48 if ":" in addr[0] else 28)


class Harness:
    """One sans-I/O node and fake peers that answer whatever it asks them at once."""

    def __init__(self, *, learning: bool = False) -> None:
        self.now = 0.0
        self.node = node = DhtNode(
            Identity.from_seed(b"\x01" * 32), DhtParams(), now=0.0,
            wall=lambda: EPOCH + self.now, rng=random.Random(1),
            public_address=None if learning else NODE, assume_reachable=learning,
        )
        self.services = plug_in(node)
        self.peers: list[Address] = []
        self.peer_set: set[Address] = set()
        self.intros: list[Introduction] = []
        if learning:
            # A bootstrap node that does not know its address yet (no --public-host): it pings
            # unsolicited requesters back to learn it.
            node.bootstrap()
            node.datagrams_to_send()
            return
        # Contacts of both families, each in its own /24 or /48; admitted the regular way,
        # by answering a PING of ours.
        self.peers += [(f"203.0.{i}.10", 5000 + i) for i in range(30)]
        self.peers += [(f"2001:db8:{i + 1:x}::10", 5000 + i) for i in range(30)]
        self.peer_set.update(self.peers)
        for a in self.peers:
            node.ping(a)
        self.pump(0.5)
        # A busy topic: 32 records from 32 announcers.
        self.busy = topic_from_name("busy")
        for i in range(32):
            src = (f"192.0.{i}.5", 6000)
            ident = Identity.from_seed(bytes([i + 2]) * 32)
            rec = sign_record(ident, self.busy, int((EPOCH + self.now) * 1000),
                              ((AddressKind.DIRECT, src),))
            token = node.storage.tokens.issue(src, self.now)
            req = m.Request(m.Command.ANNOUNCE, i, None, self.busy, token, rec.encode())
            node.receive(m.encode_request(req), src, self.now)
        assert len(node.store.get(self.busy, self.now)) == 32
        # A listener, its record stored on fake peers (its introducers).
        self.key = Identity.from_seed(b"\x09" * 32)
        self.services.listeners.listen(self.key, self.intros.append)
        self.pump(1.0)
        self.storers = node.topics.storers(listen_topic(self.key.public_key))
        assert self.storers
        node.datagrams_to_send()

    def _answer(self, data: bytes, peer: Address) -> bytes | None:
        req = m.decode(data)
        if not isinstance(req, m.Request) or req.command is m.Command.PROBE:
            return None
        nodes = () if req.command in (m.Command.FIND_NODE, m.Command.LOOKUP) else None
        token = b"\x05" * 16 if req.command is m.Command.LOOKUP else None
        return m.encode_response(
            m.Response(req.command, req.tid, NODE, node_id_for(peer), token, nodes)
        )

    def pump(self, duration: float) -> list[tuple[bytes, Address]]:
        """Run ``duration`` seconds: fake peers answer at once; returns what the node sent."""
        until = self.now + duration
        sent: list[tuple[bytes, Address]] = []
        while True:
            out = self.node.datagrams_to_send()
            if out:
                for data, dest in out:
                    sent.append((data, dest))
                    if dest in self.peer_set and data[:1] == b"\x10":
                        reply = self._answer(data, dest)
                        if reply is not None:
                            self.node.receive(reply, dest, self.now)
                continue
            t = self.node.next_timer()
            if t is None or t > until:
                break
            self.now = max(self.now, t)
            self.node.handle_timer(self.now)
        self.now = until
        return sent

    def inject(self, data: bytes, source: Address) -> list[tuple[bytes, Address]]:
        self.node.handle_timer(self.now)
        self.node.receive(data, source, self.now)
        return self.pump(WINDOW)


@dataclass
class Row:
    name: str
    limit: float
    cells: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # in, out, elsewhere
    notes: list[str] = field(default_factory=list)


def _req(command: m.Command, *, target: bytes | None = None, token: bytes | None = None,
         value: bytes | None = None, node_id: bytes | None = None, pad: int = 0) -> bytes:
    data = m.encode_request(m.Request(command, 0x5EED, node_id, target, token, value))
    if pad:  # the attacker may pad too (the PAD field), or lengthen the value
        flags = data[2] | 0x10
        data = data[:2] + bytes((flags,)) + data[3:] + pad.to_bytes(2, "big") + bytes(pad)
    return data


def _punch_probes(intro: Introduction, *, listener_open: bool) -> int:
    """Datagrams the listener's punch toward the introduced address may send, at most."""
    info = intro.client_info
    theirs = NatProfile(NatClass(info.nat_class), info.open, info.port_samples[-16:])
    ours = NatProfile(NatClass.CONSISTENT, listener_open)
    plan = PunchPlan(initiator=False, ours=ours, theirs=theirs, peer=(intro.client_address,),
                     attempt_id=intro.handshake.attempt_id, punch_key=intro.handshake.punch_key,
                     now=0.0, rng=random.Random(0))
    return int(plan.send_cap)


def measure_all() -> list[Row]:
    rows: list[Row] = []
    attacker = Identity.from_seed(b"\x0a" * 32)
    attacker_addr = ("192.0.2.99", 9999)

    def case(name: str, limit: float,
             make: Callable[[Harness, int], tuple[bytes, Address]], learning: bool = False) -> Row:
        row = Row(name, limit)
        for fam in (4, 6):
            h = Harness(learning=learning)
            made = make(h, fam)
            data, source = made
            before = len(h.intros)
            sent = h.inject(data, source)
            out = sum(wire(d, a) for d, a in sent if a == source)
            elsewhere = sum(wire(d, a) for d, a in sent if a != source)
            for intro in h.intros[before:]:
                probes = _punch_probes(intro, listener_open=True)
                elsewhere += probes * wire(bytes(PUNCH_PROBE), intro.client_address)
                natted = _punch_probes(intro, listener_open=False)
                row.notes.append(f"IPv{fam}: accepted; punch toward {intro.client_address[0]}: "
                                 f"{probes} probes (open listener), {natted} behind a NAT")
            row.cells[fam] = (wire(data, source), out, elsewhere)
        rows.append(row)
        return row

    case("PING", DHT_LIMIT, lambda h, f: (_req(m.Command.PING), VICTIM[f]))

    def with_id(command: m.Command, busy: bool = False) -> Callable[[Harness, int],
                                                                    tuple[bytes, Address]]:
        # As if from an unknown server: the id matches the forged source, so the node may
        # PING it to verify it (that PING counts too).
        def make(h: Harness, f: int) -> tuple[bytes, Address]:
            target = None if command is m.Command.PING else (h.busy if busy else bytes(32))
            return _req(command, target=target, node_id=node_id_for(VICTIM[f])), VICTIM[f]

        return make

    case("PING (with a server id)", DHT_LIMIT, with_id(m.Command.PING))
    case("FIND_NODE", DHT_LIMIT,
         lambda h, f: (_req(m.Command.FIND_NODE, target=bytes(32)), VICTIM[f]))
    case("FIND_NODE (with a server id)", DHT_LIMIT, with_id(m.Command.FIND_NODE))
    case("FIND_NODE padded +200", DHT_LIMIT,
         lambda h, f: (_req(m.Command.FIND_NODE, target=bytes(32), pad=200), VICTIM[f]))
    case("LOOKUP empty topic", DHT_LIMIT,
         lambda h, f: (_req(m.Command.LOOKUP, target=topic_from_name("empty")), VICTIM[f]))
    case("LOOKUP busy topic", DHT_LIMIT,
         lambda h, f: (_req(m.Command.LOOKUP, target=h.busy), VICTIM[f]))
    case("LOOKUP busy padded +400", DHT_LIMIT,
         lambda h, f: (_req(m.Command.LOOKUP, target=h.busy, pad=400), VICTIM[f]))
    case("LOOKUP busy (with a server id)", DHT_LIMIT, with_id(m.Command.LOOKUP, busy=True))

    def announce(h: Harness, f: int) -> tuple[bytes, Address]:
        rec = sign_record(attacker, h.busy, int((EPOCH + h.now) * 1000),
                          ((AddressKind.DIRECT, attacker_addr),))
        return (_req(m.Command.ANNOUNCE, target=h.busy, token=b"\x00" * 16, value=rec.encode()),
                VICTIM[f])

    case("ANNOUNCE", DHT_LIMIT, announce)

    def unannounce(h: Harness, f: int) -> tuple[bytes, Address]:
        w = sign_withdrawal(attacker, h.busy, int((EPOCH + h.now) * 1000))
        return (_req(m.Command.UNANNOUNCE, target=h.busy, token=b"\x00" * 16, value=w.encode()),
                VICTIM[f])

    case("UNANNOUNCE", DHT_LIMIT, unannounce)

    def check_reachable(h: Harness, f: int) -> tuple[bytes, Address]:
        for p in PLANTED[f]:  # forged requests make these look like recent requesters
            h.node.receive(_req(m.Command.PING), p, h.now)
        h.node.datagrams_to_send()
        return _req(m.Command.CHECK_REACHABLE, value=bytes(16)), VICTIM[f]

    case("CHECK_REACHABLE", DHT_LIMIT, check_reachable)

    def forward_probe(h: Harness, f: int) -> tuple[bytes, Address]:
        contact = next(p for p in h.peers if (":" in p[0]) is (f == 6))
        value = wire_address.encode(THIRD[f]) + bytes(16)
        return _req(m.Command.FORWARD_PROBE, value=value), contact

    case("FORWARD_PROBE (as a contact)", DHT_LIMIT, forward_probe)
    case("PROBE", DHT_LIMIT, lambda h, f: (_req(m.Command.PROBE, value=bytes(16)), VICTIM[f]))

    def introduce(h: Harness, f: int) -> tuple[bytes, Address]:
        # The attacker's own valid token, from a source forged as the victim.
        token = h.node.storage.tokens.issue(attacker_addr, h.now)
        hello, _ = seal_hello(attacker, h.key.public_key, PeerInfo().encode(), wall=EPOCH + h.now)
        return (_req(m.Command.INTRODUCE, target=listen_topic(h.key.public_key), token=token,
                     value=hello), VICTIM[f])

    case("INTRODUCE", DHT_LIMIT, introduce)

    def intro_forward(h: Harness, f: int) -> tuple[bytes, Address]:
        fam = [s for s in h.storers if (":" in s[0]) is (f == 6)] or h.storers
        info = PeerInfo(nat_class="random")  # asks for a birthday search, if it can
        hello, _ = seal_hello(attacker, h.key.public_key, info.encode(), wall=EPOCH + h.now)
        value = wire_address.encode(THIRD[f]) + NO_OFFER + hello
        return (_req(m.Command.INTRO_FORWARD, target=listen_topic(h.key.public_key),
                     value=value), fam[0])

    case("INTRO_FORWARD (as introducer)", DHT_LIMIT, intro_forward)

    # The blind relay (0x30-0x33). The attacker holds a real session: it was introduced
    # (from its own address) to an accomplice, and both bound. Sessions are offered as the
    # introducer offers them; the relay must answer nothing to a forged source, and forward
    # nothing to the accomplice (who asked, but not for a victim's datagrams).
    def relay_session(h: Harness, f: int) -> tuple[bytes, Address, Address]:
        assert h.services.relay.offering, "the node under attack should relay"
        me, mate = (("192.0.2.91", 9101), ("192.0.2.92", 9102)) if f == 4 else (
            ("2001:db8:91::1", 9101), ("2001:db8:92::1", 9102))
        offer = h.services.relay.offer(me, mate)
        assert offer is not None
        session, my_token, mate_token = offer
        for addr, role, token in ((me, wire_relay.ROLE_CLIENT, my_token),
                                  (mate, wire_relay.ROLE_SERVER, mate_token)):
            h.node.receive(wire_relay.encode_bind(wire_relay.Bind(role, session, token)),
                           addr, h.now)
        h.node.datagrams_to_send()
        # The session is real: the attacker's own DATA reaches the accomplice.
        data = wire_relay.encode_data(wire_relay.RelayType.DATA_TO_RELAY, session, b"hi")
        h.node.receive(data, me, h.now)
        assert [a for _, a in h.node.datagrams_to_send()] == [mate]
        return session, my_token, me

    def relay_bind(h: Harness, f: int) -> tuple[bytes, Address]:
        session, token, _ = relay_session(h, f)
        bind = wire_relay.Bind(wire_relay.ROLE_CLIENT, session, token)
        return wire_relay.encode_bind(bind), VICTIM[f]

    case("relay BIND (a real token, forged)", DHT_LIMIT, relay_bind)

    def relay_data(h: Harness, f: int) -> tuple[bytes, Address]:
        session, _, _ = relay_session(h, f)
        data = wire_relay.encode_data(wire_relay.RelayType.DATA_TO_RELAY, session, bytes(1000))
        return data, VICTIM[f]

    case("relay DATA (a paired session, forged)", DHT_LIMIT, relay_data)

    def relay_fresh_bind(h: Harness, f: int) -> tuple[bytes, Address]:
        # A BIND the relay has never heard of: a random session and token.
        bind = wire_relay.Bind(wire_relay.ROLE_SERVER, bytes(range(8)), bytes(16))
        return wire_relay.encode_bind(bind), VICTIM[f]

    case("relay BIND (unknown session)", DHT_LIMIT, relay_fresh_bind)

    def stun_modern(h: Harness, f: int) -> tuple[bytes, Address]:
        _, req = stun.build_binding_request(fingerprint=False)
        return req, VICTIM[f]

    # A node that does not know its address yet pings a stranger back to learn it.
    case("PING (node learning its address)", DHT_LIMIT,
         lambda h, f: (_req(m.Command.PING), VICTIM[f]), learning=True)
    case("FIND_NODE (node learning its addr)", DHT_LIMIT,
         lambda h, f: (_req(m.Command.FIND_NODE, target=bytes(32)), VICTIM[f]), learning=True)
    case("STUN RFC 8489", STUN_LIMIT, stun_modern)
    classic = b"\x00\x01\x00\x00" + bytes(range(16))
    case("STUN RFC 3489 classic", STUN_LIMIT, lambda h, f: (classic, VICTIM[f]))
    return rows


def print_table(rows: list[Row]) -> None:
    print()
    print(f"{'request (forged source)':<35}{'IPv4 in':>8}{'out':>6}{'x':>6}   "
          f"{'IPv6 in':>8}{'out':>6}{'x':>6}   {'elsewhere v4/v6':>16}  limit")
    for r in rows:
        line = f"{r.name:<35}"
        for fam in (4, 6):
            i, o, e = r.cells[fam]
            line += f"{i:>8}{o + e:>6}{(o + e) / i:>6.2f}   "
        line += f"{r.cells[4][2]:>8}/{r.cells[6][2]:<7}  {r.limit:.1f}x"
        print(line)
        for note in r.notes:
            print(f"    {note}")


def test_no_request_amplifies_or_redirects() -> None:
    rows = measure_all()
    print_table(rows)
    for r in rows:
        for fam in (4, 6):
            i, o, e = r.cells[fam]
            assert e == 0, f"{r.name} over IPv{fam} made the node send {e} bytes elsewhere"
            assert o <= r.limit * i, f"{r.name} over IPv{fam}: {o / i:.2f}x"


def test_proof_and_padding_unlock_whole_answers() -> None:
    """What honest requesters do: an echoed token gets the records (MORE said there were
    some), and a first request padded the way the lookup walk pads it gets all k nodes."""
    # Imported here, so that the table above can still be measured on older code.
    from dhtnode.dht.query import nodes_answer_size

    h = Harness()
    k = h.node.params.k
    for fam in (4, 6):
        src = VICTIM[fam]
        first = m.decode(h.inject(_req(m.Command.LOOKUP, target=h.busy), src)[0][0])
        assert isinstance(first, m.Response)
        assert first.more and first.value is None and first.token is not None
        again = _req(m.Command.LOOKUP, target=h.busy, token=first.token)
        second = m.decode(h.inject(again, src)[0][0])
        assert isinstance(second, m.Response)
        assert second.value is not None and not second.more
        assert len(second.nodes or ()) == k
        # A client that has no token of the node yet pads its FIND_NODE (Queries does).
        client = DhtNode(Identity.from_seed(b"\x0b" * 32), DhtParams(), now=h.now,
                         wall=lambda: EPOCH + h.now)
        dest = ("2001:db8::1", 4000) if fam == 6 else NODE
        client.rpc.request(dest, m.Command.FIND_NODE, target=bytes(32),
                           expect=nodes_answer_size(dest, k))
        (data, _), = client.datagrams_to_send()
        sent = h.inject(data, THIRD[fam])
        answer = m.decode(sent[0][0])
        assert isinstance(answer, m.Response) and len(answer.nodes or ()) == k
        ratio = wire(sent[0][0], THIRD[fam]) / wire(data, THIRD[fam])
        print(f"\nIPv{fam}: padded FIND_NODE {len(data)} B -> {len(answer.nodes or ())} nodes "
              f"({ratio:.2f}x); LOOKUP with the token -> {len(second.value)} B of records")
        assert ratio <= DHT_LIMIT
