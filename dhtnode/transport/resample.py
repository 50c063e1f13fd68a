"""Fresh mapped-port samples from a new socket: where a port-randomizing NAT is *now*.

Behind a sequential NAT every new flow takes the next port, so the samples the DHT gave us go
stale with each punch attempt. :func:`stun_ports` opens one socket from the pool and asks a
few known nodes (STUN Binding: one new flow each) for its mapping, in order, so the next
introduction carries the NAT's current position. Bounded: one socket, two sends per server,
``timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib

from dhtnode.transport.sockets import SocketPool
from dhtnode.wire import stun
from dhtnode.wire.address import Address


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
