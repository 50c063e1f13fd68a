"""A discrete-event network of sans-I/O DHT nodes: virtual time, no sockets.

Every node is a real :class:`~dhtnode.dht.node.DhtNode`; only the wire is simulated. A datagram
sent at virtual time t arrives at t + latency (unless lost or its receiver is dead), and each
node's timers fire at their deadlines. A host can be *firewalled*: it then drops inbound
datagrams from addresses it has not sent to, like a NAT with endpoint-dependent filtering,
which is what the DHT's reachability check must detect.

Used by tests (hundreds of nodes in a second) and by ``benchmarks/`` (thousands of nodes).
Owns nothing of the protocol.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from dhtnode.crypto.identity import Identity
from dhtnode.dht.node import DhtNode, DhtParams
from dhtnode.dht.op import Op
from dhtnode.wire.address import Address

T = TypeVar("T")

#: Seconds a firewalled host keeps letting in a peer it sent to: RFC 4787's recommended
#: (not minimum) UDP mapping lifetime, longer than Linux conntrack's 30/120 s.
FIREWALL_IDLE = 300.0
#: Wall-clock time (Unix seconds) at virtual time 0; records are signed with EPOCH + now.
EPOCH = 1_800_000_000.0


@dataclass(slots=True)
class SimHost:
    node: DhtNode
    addr: Address
    firewalled: bool = False
    alive: bool = True
    #: Firewall state: address -> virtual time we last sent to it.
    contacted: dict[Address, float] = field(default_factory=dict)
    timer_at: float | None = None


class SimNetwork:
    def __init__(
        self,
        *,
        seed: int = 1,
        latency: float = 0.02,
        jitter: float = 0.01,
        loss: float = 0.0,
        params: DhtParams | None = None,
    ) -> None:
        self.rng = random.Random(seed)
        self.latency = latency
        self.jitter = jitter
        self.loss = loss
        self.params = params or DhtParams()
        self.now = 0.0
        self.hosts: dict[Address, SimHost] = {}
        self._events: list[tuple[float, int, int, Address, bytes, Address]] = []
        self._seq = itertools.count()
        self.delivered = 0
        self.dropped = 0
        self._next_ip = 1

    # kinds of event
    _DELIVER = 0
    _TIMER = 1

    def wall(self) -> float:
        return EPOCH + self.now

    def next_address(self) -> Address:
        n = self._next_ip
        self._next_ip += 1
        # 198.51.100.0/24 is too small for thousands of hosts; vary the port per host too.
        return (f"198.51.{100 + (n >> 8) % 4}.{n & 0xFF}", 20000 + n)

    def add_node(
        self,
        *,
        addr: Address | None = None,
        bootstrap_node: bool = False,
        firewalled: bool = False,
        identity: Identity | None = None,
        seeds: tuple[Address, ...] = (),
    ) -> SimHost:
        addr = addr or self.next_address()
        node = DhtNode(
            identity or Identity.from_seed(self.rng.randbytes(32)),
            self.params,
            now=self.now,
            wall=self.wall,
            rng=random.Random(self.rng.getrandbits(64)),
            # Seeded, so that a run replays exactly; real nodes take secrets from the OS.
            secret_bytes=random.Random(self.rng.getrandbits(64)).randbytes,
            public_address=addr if bootstrap_node else None,
            seeds=seeds,
        )
        host = SimHost(node, addr, firewalled)
        self.hosts[addr] = host
        self._service(host)
        return host

    def kill(self, addr: Address) -> None:
        """Stop a host dead: it neither answers nor sends (no goodbye)."""
        self.hosts[addr].alive = False

    def start(self, host: SimHost, fn: Callable[[DhtNode], Op[T]]) -> Op[T]:
        return self.act(host, fn)

    def act(self, host: SimHost, fn: Callable[[DhtNode], T]) -> T:
        """Call ``fn`` on the host's engine now, and send what it queued."""
        host.node.handle_timer(self.now)  # operations read the engine's notion of now
        out = fn(host.node)
        self._service(host)
        return out

    def run_until(self, t: float, *, stop: Callable[[], bool] | None = None) -> None:
        while self._events and self._events[0][0] <= t:
            if stop is not None and stop():
                return
            when, _, kind, dest, data, source = heapq.heappop(self._events)
            self.now = when
            host = self.hosts.get(dest)
            if host is None or not host.alive:
                if kind == self._DELIVER:
                    self.dropped += 1
                continue
            if kind == self._DELIVER:
                if host.firewalled and when - host.contacted.get(source, -1e18) > FIREWALL_IDLE:
                    self.dropped += 1
                    continue
                self.delivered += 1
                host.node.receive(data, source, when)
            else:
                if host.timer_at != when:
                    continue  # superseded by an earlier registration
                host.timer_at = None
                host.node.handle_timer(when)
            self._service(host)
        if stop is None or not stop():
            self.now = max(self.now, t)

    def run_op(self, host: SimHost, fn: Callable[[DhtNode], Op[T]], timeout: float = 60.0) -> Op[T]:
        op = self.start(host, fn)
        self.run_until(self.now + timeout, stop=lambda: op.done)
        return op

    def _service(self, host: SimHost) -> None:
        node = host.node
        node.events.clear()
        for data, dest in node.datagrams_to_send():
            host.contacted[dest] = self.now
            if self.loss and self.rng.random() < self.loss:
                self.dropped += 1
                continue
            delay = self.latency + self.rng.random() * self.jitter
            heapq.heappush(
                self._events,
                (self.now + delay, next(self._seq), self._DELIVER, dest, data, host.addr),
            )
        deadline = node.next_timer()
        if deadline is not None:
            when = max(deadline, self.now)
            if host.timer_at is None or when < host.timer_at:
                host.timer_at = when
                heapq.heappush(
                    self._events, (when, next(self._seq), self._TIMER, host.addr, b"", host.addr)
                )


def build_network(
    n: int,
    *,
    seed: int = 1,
    params: DhtParams | None = None,
    firewalled_share: float = 0.0,
    batch: int = 50,
    settle: float = 20.0,
) -> SimNetwork:
    """A network of ``n`` nodes: one bootstrap node, the rest joining in batches through it,
    then ``settle`` virtual seconds for reachability checks and table refreshes."""
    net = SimNetwork(seed=seed, params=params)
    first = net.add_node(bootstrap_node=True)
    rng = random.Random(seed)
    for start in range(1, n, batch):
        for _ in range(start, min(n, start + batch)):
            h = net.add_node(firewalled=rng.random() < firewalled_share, seeds=(first.addr,))
            net.start(h, lambda node: node.bootstrap())
        net.run_until(net.now + 3.0)
    net.run_until(net.now + settle)
    return net


def natlab_shape(seed: int, params: DhtParams | None = None) -> tuple[SimNetwork, SimHost]:
    """``tests/test_natlab.py`` in virtual time: two bootstrap nodes, two nodes behind
    filtering NATs (settled for 20 s), then a public newcomer listing both bootstrap nodes,
    just started. Returns the network and the newcomer."""
    net = SimNetwork(seed=seed, params=params or DhtParams())
    pub1 = net.add_node(bootstrap_node=True)
    pub3 = net.add_node(bootstrap_node=True, seeds=(pub1.addr,))
    net.run_op(pub3, lambda node: node.bootstrap())
    boot = (pub1.addr, pub3.addr)
    for _ in range(2):
        natted = net.add_node(firewalled=True, seeds=boot)
        net.start(natted, lambda node: node.bootstrap())
    net.run_until(net.now + 20.0)
    pub2 = net.add_node(seeds=boot)
    net.start(pub2, lambda node: node.bootstrap())
    return net, pub2
