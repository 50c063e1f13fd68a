"""Relay first, then direct, on loopback: the punch is held back, so the connection starts on
the introducer's blind relay; a 20 MB transfer on one stream runs while the punch is let
through and the connection moves to the direct path under QUIC: the data arrives intact on the
same stream, the relay stops forwarding after the move, and what it forwarded was ciphertext."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time

import pytest

import dhtnode.transport.connections as connections_module
from dhtnode.crypto.identity import Identity
from tests.loopnet import Peer, sha256_sink

SIZE = 20 << 20
MARKER = b"PLAINTEXT-MARKER-" * 4


async def test_relayed_then_direct_mid_transfer(
    net: list[Peer], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connections_module, "RELAY_GRACE", 0.0)
    server, client = net[-1], net[-2]
    held_until = [time.monotonic() + 1e9]
    for p in (server, client):
        orig = p.conns.punch.datagram

        def gated(slot: int, data: bytes, source: tuple[str, int], orig=orig) -> None:
            if time.monotonic() >= held_until[0]:
                orig(slot, data, source)

        p.conns.punch.datagram = gated  # type: ignore[method-assign]
    # Watch what every relay forwards.
    forwarded: list[bytes] = []
    for p in net:
        table = p.conns.services.relay.table
        orig_recv = table.receive

        def spy(data: bytes, source: tuple[str, int], now: float, orig_recv=orig_recv):  # type: ignore[no-untyped-def]
            out = orig_recv(data, source, now)
            forwarded.extend(d for d, _ in out if d[0] == 0x33)
            return out

        table.receive = spy  # type: ignore[method-assign]

    key = Identity.generate()
    got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    tasks: list[asyncio.Task[None]] = []
    await server.conns.listen(key, lambda c: tasks.append(asyncio.create_task(sha256_sink(c, got))))
    conn = await client.conns.connect(key.public_key)
    assert conn.path == "relayed" and conn.first_path == "relayed"
    reader, writer = await conn.open_stream()
    payload = MARKER + os.urandom(SIZE - len(MARKER))
    chunk = 1 << 16
    relay_bytes_at_move = -1
    for i in range(0, SIZE, chunk):
        writer.write(payload[i : i + chunk])
        await writer.drain()
        if i == SIZE // 4:
            held_until[0] = time.monotonic()  # let the punch through mid-transfer
        if conn.path == "direct" and relay_bytes_at_move < 0:
            relay_bytes_at_move = sum(len(d) for d in forwarded)
    writer.write_eof()
    answer = await asyncio.wait_for(reader.read(), 30)
    assert answer[:32] == hashlib.sha256(payload).digest()
    assert int.from_bytes(answer[32:], "big") == SIZE
    await asyncio.wait_for(conn.settled.wait(), 10)
    assert conn.path == "direct"
    assert relay_bytes_at_move > 0
    relayed = sum(len(d) for d in forwarded)
    print(f"relayed {relayed / 1e6:.1f} MB before the move, "
          f"{(relayed - relay_bytes_at_move) / 1e6:.2f} MB after; {SIZE / 1e6:.0f} MB in all")
    # After the move the relay carries (almost) nothing more: in-flight packets only.
    assert relayed - relay_bytes_at_move < SIZE / 10
    assert not any(MARKER in d for d in forwarded)
    await conn.close()
    for t in tasks:
        t.cancel()
