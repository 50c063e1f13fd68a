"""In-process helpers for the attack tests: a serving engine driven by hand, forged answers,
and a host of many ports that lies (a Sybil swarm on one IP) for the simulated network."""

from __future__ import annotations

import random
from collections.abc import Iterable

from dhtnode.crypto.identity import Identity
from dhtnode.dht.ids import distance, node_id_for
from dhtnode.dht.node import DhtNode, DhtParams
from dhtnode.sim.network import EPOCH, SimHost, SimNetwork
from dhtnode.wire import messages as m
from dhtnode.wire.address import Address

#: The public address of the node under attack (documentation range).
VICTIM: Address = ("192.0.2.10", 4000)


def honest_addresses(n: int, *, first: int = 0) -> list[Address]:
    """``n`` addresses of distinct hosts in distinct /24s (198.18.0.0/15, benchmarking)."""
    return [(f"198.18.{(first + i) % 250}.{(first + i) // 250 + 1}", 5000) for i in range(n)]


def serving_node(seed: int = 1, params: DhtParams | None = None) -> DhtNode:
    """A bootstrap-style node serving at :data:`VICTIM`, driven by hand (virtual time)."""
    rng = random.Random(seed)
    return DhtNode(
        Identity.from_seed(rng.randbytes(32)),
        params or DhtParams(),
        now=0.0,
        wall=lambda: EPOCH,
        rng=rng,
        secret_bytes=random.Random(seed + 1).randbytes,
        public_address=VICTIM,
    )


def answer_from(
    node: DhtNode, peers: Iterable[Address], now: float, *, seen_as: Address | None = None
) -> int:
    """Make ``node`` PING each of ``peers`` and feed it each peer's answer (id = H(peer));
    ``seen_as`` is the address the answers claim they saw the node at. Returns answers fed."""
    fed = 0
    for peer in peers:
        node.ping(peer)
        for data, dest in node.datagrams_to_send():
            if dest != peer:
                continue
            req = m.decode(data)
            assert isinstance(req, m.Request)
            resp = m.Response(req.command, req.tid, seen_as or VICTIM, node_id_for(peer))
            node.receive(m.encode_response(resp), peer, now)
            fed += 1
    return fed


def grind_ports(ip: str, target: bytes, n: int, ports: range = range(1024, 65536)) -> list[Address]:
    """The ``n`` ports of ``ip`` whose ids lie nearest ``target``: what an attacker owning
    one IP does to sit next to a key."""
    ranked = sorted((distance(node_id_for((ip, p)), target), p) for p in ports)
    return [(ip, p) for _, p in ranked[:n]]


class LyingPort:
    """One port of a Sybil host: answers every request as a server would, but stores nothing,
    returns no records, steers every lookup to its own swarm, and (``lie_to``) claims to see
    its requesters at an address of its choosing. Duck-types what ``SimNetwork`` drives."""

    def __init__(self, addr: Address, swarm: list[Address], *, lie_to: Address | None = None):
        self.addr = addr
        self.swarm = swarm
        self.lie_to = lie_to
        self.events: list[tuple[str, dict[str, object]]] = []
        self._out: list[tuple[bytes, Address]] = []
        self.requests = 0

    def join(self, others: Iterable[Address]) -> None:
        """Announce itself: a request carrying its id to each of ``others``."""
        for i, other in enumerate(others):
            req = m.Request(m.Command.PING, 0x5B000000 + i, node_id_for(self.addr))
            self._out.append((m.encode_request(req), other))

    def receive(self, data: bytes, source: Address, now: float) -> bool:
        try:
            msg = m.decode(data)
        except Exception:
            return True
        if not isinstance(msg, m.Request):
            return True
        self.requests += 1
        nodes = None
        if msg.target is not None:
            t = msg.target
            nodes = tuple(sorted(self.swarm, key=lambda a: distance(node_id_for(a), t))[:20])
        resp = m.Response(
            msg.command, msg.tid, self.lie_to or source, node_id_for(self.addr),
            token=bytes(16), nodes=nodes,
        )
        self._out.append((m.encode_response(resp), source))
        return True

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        out, self._out = self._out, []
        return out

    def next_timer(self) -> float | None:
        return None

    def handle_timer(self, now: float) -> None:
        pass


def add_liars(net: SimNetwork, addrs: list[Address], *, lie_to: Address | None = None
              ) -> list[LyingPort]:
    ports = [LyingPort(a, addrs, lie_to=lie_to) for a in addrs]
    for p in ports:
        net.hosts[p.addr] = SimHost(p, p.addr)  # type: ignore[arg-type]
    return ports


def flush(net: SimNetwork, ports: list[LyingPort]) -> None:
    """Send what the liars queued outside an event (their join requests)."""
    for p in ports:
        net._service(net.hosts[p.addr])
