"""A relayed-only connection survives its relay's death, on loopback with real sockets.

The punch is held back for good (as between two port-randomizing NATs), so the connection runs
over the introducer's blind relay. Mid-transfer the relay's node is stopped (its socket closed):
the client notices the relay's silence, introduces itself again through another introducer,
and the same QUIC connection moves onto that introducer's relay; the transfer completes intact
(checksum) on the same stream, with the dead-peer watch of forwarding running on both ends
(it must not take the failover for a dead peer). Without another relay the connection closes with
``CLOSE_RELAY_LOST`` and a reason.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time

import pytest

import dhtnode.transport.connections as connections_module
from dhtnode.crypto.identity import Identity
from dhtnode.transport.connection import Connection, watch_peer
from dhtnode.transport.quic import CLOSE_RELAY_LOST
from dhtnode.transport.relaypath import RELAY_DEAD_AFTER
from tests.loopnet import Peer, sha256_sink

SIZE = 6 << 20
CHUNK = 1 << 16


def _hold_punches(net: list[Peer]) -> None:
    """Drop every punch datagram: the pair stays relayed, as two random NATs would."""
    for p in net:
        p.conns.punch.datagram = lambda slot, data, source: None  # type: ignore[method-assign]


async def _stop(peer: Peer) -> None:
    """The relay's node goes away: its socket closes, nothing answers any more."""
    await peer.conns.close()
    peer.ep.close()


def _relay_peer(net: list[Peer], conn: Connection) -> Peer:
    assert conn.relay is not None
    return next(p for p in net if p.ep.local_address == conn.relay.relay)


async def test_relay_dies_mid_transfer_connection_moves_to_another_relay(
    net: list[Peer], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connections_module, "RELAY_GRACE", 0.0)
    _hold_punches(net)
    server, client = net[-1], net[-2]
    key = Identity.generate()
    got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    server_conns: list[Connection] = []
    tasks: list[asyncio.Task[None]] = []

    def accepted(c: Connection) -> None:
        server_conns.append(c)
        tasks.append(asyncio.create_task(sha256_sink(c, got)))
        # As forward/expose run it: the failover must not look like a dead peer to it.
        tasks.append(asyncio.create_task(watch_peer(c)))

    await server.conns.listen(key, accepted)
    conn = await client.conns.connect(key.public_key)
    assert conn.path == "relayed"
    first_relay = _relay_peer(net, conn)
    assert first_relay not in (server, client)
    quic = conn.quic
    tasks.append(asyncio.create_task(watch_peer(conn)))
    reader, writer = await conn.open_stream()
    payload = os.urandom(SIZE)
    killed_at = moved_after = -1.0
    for i in range(0, SIZE, CHUNK):
        writer.write(payload[i : i + CHUNK])
        await asyncio.wait_for(writer.drain(), 30)
        if i == SIZE // 4:
            await _stop(first_relay)
            killed_at = time.monotonic()
        if killed_at > 0 and moved_after < 0 and conn.relay is not None \
                and conn.relay.relay != first_relay.ep.local_address:
            moved_after = time.monotonic() - killed_at
    writer.write_eof()
    answer = await asyncio.wait_for(reader.read(), 30)
    assert answer[:32] == hashlib.sha256(payload).digest()
    assert int.from_bytes(answer[32:], "big") == SIZE
    # The same QUIC connection, now on another relay, on both sides.
    assert conn.quic is quic and not quic.closed
    assert conn.relay is not None and conn.relay.relay != first_relay.ep.local_address
    assert conn.path == "relayed"
    assert client.conns.stats["relay_moved"] == 1
    assert server.conns.stats["relay_moved"] == 1
    assert server_conns[0].relay is not None
    assert server_conns[0].relay.relay == conn.relay.relay
    print(f"moved to another relay {moved_after:.2f} s after the relay died")
    assert 0 < moved_after < RELAY_DEAD_AFTER + 12
    await conn.close()
    for t in tasks:
        t.cancel()


async def test_relay_dies_and_no_other_relay_closes_with_a_reason(
    net: list[Peer], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connections_module, "RELAY_GRACE", 0.0)
    _hold_punches(net)
    server, client = net[-1], net[-2]
    key = Identity.generate()
    await server.conns.listen(key, lambda c: None)
    conn = await client.conns.connect(key.public_key)
    assert conn.path == "relayed"
    first_relay = _relay_peer(net, conn)
    for p in net:
        if p is not first_relay:
            p.conns.services.relay.enabled = False  # nobody else offers a relay
    started = time.monotonic()
    await _stop(first_relay)
    await asyncio.wait_for(conn.wait_closed(), RELAY_DEAD_AFTER + 20)
    print(f"closed {time.monotonic() - started:.2f} s after the relay died: "
          f"{conn.quic.close_reason}")
    assert conn.quic.close_code == CLOSE_RELAY_LOST
    assert "went away" in conn.quic.close_reason
    assert client.conns.stats["relay_rescue_failed"] == 1
