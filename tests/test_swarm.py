"""Topic swarms on loopback: six peers join one topic and every pair ends with exactly one
connection (the smaller key dials), usable both ways; a peer that leaves drops out."""

from __future__ import annotations

import asyncio
import time

from dhtnode.crypto.identity import Identity
from dhtnode.dht.ids import topic_from_name
from dhtnode.transport.connection import Connection
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


async def test_larger_key_killed_and_restarted_is_dialled_again_quickly(
    net: list[Peer],
) -> None:
    """The member with the largest key (it dials nobody) dies without a word and joins again
    with its key on another node: the others notice the dead connection in seconds (liveness
    watch), look again at once and dial it; before, they kept the dead connection until QUIC's
    30 s idle timeout and then waited for a backed-off lookup (about 40 s in the NAT lab)."""
    topic = topic_from_name("swarm-restart")
    idents = sorted((Identity.generate() for _ in range(3)), key=lambda i: i.public_key)
    swarms: list[Swarm] = []
    try:
        for p, ident in zip(net[2:5], idents, strict=True):
            swarms.append(await Swarm.join(p.conns, topic, ident, lambda c: None))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(len(s.peers) < 2 for s in swarms):
            await asyncio.sleep(0.2)
        assert [len(s.peers) for s in swarms] == [2, 2, 2]
        largest = swarms.pop()
        stale = [s.peers[largest.public_key] for s in swarms]
        # SIGKILL: no CONNECTION_CLOSE, no withdrawal; its node's socket just goes.
        for t in [largest._task, *largest._tasks]:
            if t is not None:
                t.cancel()
        net[4].ep.close()
        killed = time.monotonic()
        again = await Swarm.join(net[6].conns, topic, idents[2], lambda c: None)
        swarms.append(again)
        deadline = killed + 30
        while time.monotonic() < deadline and not all(
            s.peers.get(largest.public_key) not in (None, old)
            for s, old in zip(swarms[:2], stale, strict=True)
        ):
            await asyncio.sleep(0.1)
        took = time.monotonic() - killed
        print(f"larger key killed and restarted: dialled again after {took:.1f} s")
        for s, old in zip(swarms[:2], stale, strict=True):
            conn = s.peers.get(largest.public_key)
            assert conn is not None and conn is not old and not conn.quic.closed
        assert took < 15
    finally:
        for s in swarms:
            await s.leave()
