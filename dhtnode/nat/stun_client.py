"""A small asyncio STUN client: "what address does this server see me as?"

Sends RFC 8489 Binding requests from a fresh UDP socket, retransmitting with doubling
intervals (bounded by ``retries``), and returns the mapped address of the first valid answer.
Used by ``dhtnode stun HOST:PORT``; the DHT itself learns its address from DHT responses.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

from dhtnode.errors import DecodeError, DhtnodeError
from dhtnode.wire import stun
from dhtnode.wire.address import Address, format_addr, normalize


class StunTimeout(DhtnodeError):
    """No STUN answer arrived."""

    code = "no_network"


class _Receiver(asyncio.DatagramProtocol):
    def __init__(self, tid: bytes, server: Address) -> None:
        self.tid = tid
        self.server = server
        self.result: asyncio.Future[Address] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if self.result.done() or normalize(addr) != self.server:
            return
        with contextlib.suppress(DecodeError):
            self.result.set_result(stun.parse_binding_response(data, self.tid))


async def stun_query(
    server: Address, *, timeout: float = 1.0, retries: int = 3, local: Address | None = None
) -> Address:
    """Our address as ``server`` sees it. Raises :class:`StunTimeout` after ``retries``
    retransmissions with doubling waits starting at ``timeout`` seconds."""
    family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
    loop = asyncio.get_running_loop()
    tid, request = stun.build_binding_request()
    transport, proto = await loop.create_datagram_endpoint(
        lambda: _Receiver(tid, server),
        local_addr=local or ("::" if family == socket.AF_INET6 else "0.0.0.0", 0),
        family=family,
    )
    try:
        wait = timeout
        for _ in range(retries + 1):
            transport.sendto(request, server)
            done, _ = await asyncio.wait({proto.result}, timeout=wait)
            if done:
                return proto.result.result()
            wait *= 2
    finally:
        transport.close()
    raise StunTimeout(
        f"no STUN answer from {format_addr(server)} after {retries + 1} attempts; check the "
        "address and port, and that UDP to it is not blocked"
    )
