"""Port forwarding by key on loopback: a TCP service exposed under a key and reached through a
local forwarded port; many TCP connections at once over one QUIC connection, data intact,
half-close both ways, and a restart of the exposing side picked up without restarting the
forwarding side."""

from __future__ import annotations

import asyncio
import hashlib
import os

from dhtnode.crypto.identity import Identity
from dhtnode.transport.forward import Exposer, Forwarder
from tests.loopnet import Peer

PAYLOAD = os.urandom(1 << 20)


async def _service(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read a request until EOF (half-close), answer with its hash and the payload."""
    request = await reader.read()
    writer.write(hashlib.sha256(request).digest() + PAYLOAD)
    await writer.drain()
    writer.close()


async def _fetch(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    writer.write_eof()  # half-close: the answer still comes back
    data = await reader.read()
    writer.close()
    return data


async def test_expose_and_forward(net: list[Peer]) -> None:
    service = await asyncio.start_server(_service, "127.0.0.1", 0)
    target = service.sockets[0].getsockname()[:2]
    key = Identity.generate()
    friend = Identity.generate()
    exposer = Exposer(net[-1].conns, key, target, allow=lambda k: k == friend.public_key)
    await exposer.start()
    fwd = Forwarder(net[-2].conns, key.public_key, ("127.0.0.1", 0), identity=friend)
    _, port = await fwd.start()
    try:
        requests = [os.urandom(1000 + i) for i in range(20)]
        answers = await asyncio.wait_for(
            asyncio.gather(*(_fetch(port, r) for r in requests)), 60
        )
        for req, ans in zip(requests, answers, strict=True):
            assert ans[:32] == hashlib.sha256(req).digest()
            assert ans[32:] == PAYLOAD
        assert fwd.connects == 1 and exposer.streams == 20

        # The exposing side restarts (same key): the next fetch reconnects by itself.
        await exposer.close()
        exposer = Exposer(net[-3].conns, key, target, allow=lambda k: k == friend.public_key)
        await exposer.start()
        await asyncio.sleep(0.5)
        ans = await asyncio.wait_for(_fetch(port, b"again"), 30)
        assert ans[:32] == hashlib.sha256(b"again").digest() and ans[32:] == PAYLOAD
        assert fwd.connects == 2
    finally:
        await fwd.close()
        await exposer.close()
        service.close()
