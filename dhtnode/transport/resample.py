"""Fresh mapped-port samples from a new socket: where a port-randomizing NAT is *now*.

Behind a sequential NAT every new flow takes the next port, so the samples the DHT gave us go
stale with each punch attempt. :func:`stun_ports` opens one socket from the pool and asks a
few known nodes (STUN Binding: one new flow each) for its mapping, in order, so the next
introduction carries the NAT's current position. Bounded: one socket, two sends per server,
``timeout`` seconds. :class:`Resampler` decides when (after punch attempts, when the samples
show no sequence) and hands the result to the Listeners service.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from typing import TYPE_CHECKING

from dhtnode.connect.peerinfo import PeerInfo
from dhtnode.nat.strategy import MIN_STEP_SAMPLES
from dhtnode.transport.punching import profile_of
from dhtnode.transport.sockets import SocketPool
from dhtnode.wire import stun
from dhtnode.wire.address import Address

if TYPE_CHECKING:
    from dhtnode.connect.listen import Listeners
    from dhtnode.dht.node import DhtNode

#: Behind a sequential NAT every new flow takes the next port, so the samples the DHT gave us
#: go stale with each punch attempt (its probes and extra sockets are new flows). A fresh
#: socket then asks this many known nodes (STUN Binding: one new flow each) for our mapping,
#: so the next introduction carries the NAT's current position.
RESAMPLE_SERVERS = MIN_STEP_SAMPLES
#: Seconds to wait for those answers; one retransmission halfway.
RESAMPLE_TIMEOUT = 0.5


async def stun_ports(pool: SocketPool, servers: list[Address], timeout: float) -> list[int]:
    """Our mapped ports as ``servers`` see one fresh socket, in the order the requests left
    (the NAT allocated them in that order); [] with fewer than two servers."""
    if len(servers) < 2:
        return []
    requests = {addr: stun.build_binding_request() for addr in servers}
    mapped: dict[Address, int] = {}
    done = asyncio.get_running_loop().create_future()

    def on_datagram(slot: int, data: bytes, source: Address) -> None:
        req = requests.get(source)
        if req is None or source in mapped:
            return
        with contextlib.suppress(stun.StunError):
            mapped[source] = stun.parse_binding_response(data, req[0])[1]
        if len(mapped) == len(servers) and not done.done():
            done.set_result(None)

    try:
        lease = await pool.acquire(1, on_datagram, timeout=timeout)
    except Exception:
        return []
    try:
        for _ in range(2):
            for addr in servers:
                if addr not in mapped:
                    lease.send(1, requests[addr][1], addr)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(done), timeout / 2)
            if done.done():
                break
    finally:
        lease.close()
    return [mapped[a] for a in servers if a in mapped]


class Resampler:
    """Keeps the port samples an introduction carries fresh behind a port-randomizing NAT."""

    def __init__(
        self, pool: SocketPool, node: DhtNode, listeners: Listeners, stats: Counter[str]
    ) -> None:
        self._pool = pool
        self._node = node
        self._listeners = listeners
        self._stats = stats
        #: Punch attempts since our last fresh port samples (see :data:`RESAMPLE_SERVERS`).
        self.stale = False
        self._task: asyncio.Task[None] | None = None

    def punch_started(self) -> None:
        self.stale = True  # its probes and extra sockets are new flows

    def needed(self, info: PeerInfo) -> bool:
        """Whether to sample before an introduction that carries ``info``: behind a random
        NAT whose samples are stale, show no sequence, or are being taken right now."""
        prof = profile_of(info)
        if not prof.random:
            return False
        running = self._task is not None and not self._task.done()
        return running or self.stale or not prof.predictable

    def start(self) -> asyncio.Task[None]:
        """Take fresh mapped-port samples from a new socket (see :data:`RESAMPLE_SERVERS`),
        unless that is under way already; one run at a time."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        return self._task

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        # Stale from here on only if another attempt starts while we sample.
        self.stale = False
        known = [c.addr for c in self._node.table] + list(self._node.queries.seeds)
        # The samples' family: IPv4 whenever we know IPv4 nodes (the observer's primary).
        v4 = [a for a in known if ":" not in a[0]]
        servers = list(dict.fromkeys(v4 or known))[:RESAMPLE_SERVERS]
        ports = await stun_ports(self._pool, servers, RESAMPLE_TIMEOUT)
        if len(ports) >= MIN_STEP_SAMPLES:
            self._listeners.set_fresh_samples(tuple(ports))
            self._stats["resample_ok"] += 1
        else:
            self._stats["resample_failed"] += 1
