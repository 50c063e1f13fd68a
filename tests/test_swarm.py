"""Topic swarms on loopback: six peers join one topic and every pair ends with exactly one
connection (the smaller key dials), usable both ways; a peer that leaves drops out."""

from __future__ import annotations

import asyncio
import time

from dhtnode.crypto.identity import Identity
from dhtnode.dht.ids import topic_from_name
from dhtnode.transport.connections import Connection
from dhtnode.transport.swarm import Swarm
from tests.loopnet import Peer


async def test_every_pair_one_connection(net: list[Peer]) -> None:
    topic = topic_from_name("swarm-test")
    members = net[2:8]
    swarms: list[Swarm] = []
    accepted: list[Connection] = []
    try:
        for p in members:
            swarms.append(await Swarm.join(p.conns, topic, Identity.generate(), accepted.append))
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and any(len(s.peers) < 5 for s in swarms):
            await asyncio.sleep(0.2)
        assert [len(s.peers) for s in swarms] == [5] * 6
        keys = {s.public_key for s in swarms}
        for s in swarms:
            assert set(s.peers) == keys - {s.public_key}
        # Exactly one connection per pair: 15 pairs, each seen from both ends.
        assert len(accepted) == 30
        # The pair's connection carries data both ways.
        a, b = swarms[0], swarms[1]
        conn = a.peers[b.public_key]
        _, writer = await conn.open_stream()
        writer.write(b"ping")
        writer.write_eof()
        r2, _ = await b.peers[a.public_key].accept_stream()
        assert await r2.read() == b"ping"
        # One leaves: the others drop it.
        gone = swarms.pop()
        await gone.leave()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(gone.public_key in s.peers for s in swarms):
            await asyncio.sleep(0.1)
        assert not any(gone.public_key in s.peers for s in swarms)
    finally:
        for s in swarms:
            await s.leave()
