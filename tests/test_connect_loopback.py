"""Connect by public key on real UDP sockets on 127.0.0.1, in one process: listen, introduce
through the DHT, punch, QUIC with both keys pinned, echo over streams; refusals, unknown keys,
and 100 connects in a row leaving no connections, sockets, file descriptors or tasks."""

from __future__ import annotations

import asyncio
import gc
import os
import time

import pytest

from dhtnode.connect.connector import ConnectRefused, PeerNotFound
from dhtnode.crypto.identity import Identity
from dhtnode.transport.connection import Connection
from tests.loopnet import Peer


async def echo_server(conn: Connection) -> None:
    reader, writer = await conn.accept_stream()
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.write_eof()


async def test_connect_by_key_and_echo(net: list[Peer]) -> None:
    server, client = net[-1], net[-2]
    key = Identity.generate()
    tasks: list[asyncio.Task[None]] = []
    accepted: list[Connection] = []

    def on_connection(conn: Connection) -> None:
        accepted.append(conn)
        tasks.append(asyncio.create_task(echo_server(conn)))

    await server.conns.listen(key, on_connection)
    me = Identity.generate()
    conn = await client.conns.connect(key.public_key, identity=me)
    assert conn.peer_key == key.public_key and conn.path == "direct"
    assert conn.strategy in ("direct", "simultaneous")
    reader, writer = await conn.open_stream()
    writer.write(b"hello over quic")
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 5) == b"hello over quic"
    assert accepted and accepted[0].peer_key == me.public_key
    st = client.ep.node.status()
    assert any(c["public_key"] == key.public_key.hex() for c in st["connections"])
    await conn.close()
    for t in tasks:
        t.cancel()


async def test_refused_unknown_and_many_in_a_row(net: list[Peer]) -> None:
    server, client = net[-1], net[-3]
    key = Identity.generate()
    friend = Identity.generate()
    tasks: list[asyncio.Task[None]] = []

    def on_connection(conn: Connection) -> None:
        tasks.append(asyncio.create_task(echo_server(conn)))

    await server.conns.listen(key, on_connection, allow=lambda k: k == friend.public_key)
    with pytest.raises(ConnectRefused):
        await client.conns.connect(key.public_key, identity=Identity.generate())
    t0 = time.monotonic()
    with pytest.raises(PeerNotFound):
        await client.conns.connect(Identity.generate().public_key, identity=friend)
    assert time.monotonic() - t0 < 5

    fds_before = len(os.listdir("/proc/self/fd"))
    tasks_before = len(asyncio.all_tasks())
    for i in range(100):
        conn = await client.conns.connect(key.public_key, identity=friend)
        reader, writer = await conn.open_stream()
        writer.write(b"x%d" % i)
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b"x%d" % i
        await conn.close()
    await asyncio.sleep(0.2)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    gc.collect()
    # Nothing left behind: connections, attempts, extra sockets.
    for p in (client, server):
        sizes = p.conns.bridge.table_sizes()
        assert sizes["connections"] == 0, sizes
        assert p.conns.pool.open_sockets == 0
    await asyncio.sleep(2.5)  # attempts linger briefly for trailing probes, then go
    assert not client.conns.punch.attempts and not server.conns.punch.attempts
    assert len(os.listdir("/proc/self/fd")) <= fds_before
    assert len(asyncio.all_tasks()) <= tasks_before


async def test_port_searches_toward_one_ip_are_budgeted(net: list[Peer]) -> None:
    """A lying introducer cannot make a node spray thousands of probes at a victim over and
    over: port searches toward one IP are budgeted (then the connection goes relayed)."""
    from dhtnode.transport.punching import SEARCHES_PER_IP

    conns = net[-1].conns
    allowed = [conns.punch.search_allowed("198.51.100.9") for _ in range(SEARCHES_PER_IP + 2)]
    assert allowed == [True] * SEARCHES_PER_IP + [False, False]
    assert conns.punch.search_allowed("198.51.100.10")


async def test_incoming_connections_are_bounded_per_key(
    net: list[Peer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client key holds at most MAX_INCOMING_PER_KEY connections to a listener: the next
    introduction is refused as busy (before anything is punched), with a message that says
    so; once one closes, the key connects again."""
    from dhtnode.transport import admission

    monkeypatch.setattr(admission, "MAX_INCOMING_PER_KEY", 2)
    server, client = net[-1], net[-4]
    key = Identity.generate()
    me = Identity.generate()
    await server.conns.listen(key, lambda conn: None)
    first = await client.conns.connect(key.public_key, identity=me)
    second = await client.conns.connect(key.public_key, identity=me)
    busy_before = server.ep.node.stats["hello_busy"]
    with pytest.raises(ConnectRefused, match="as many connections as it takes"):
        await client.conns.connect(key.public_key, identity=me)
    assert server.ep.node.stats["hello_busy"] == busy_before + 1
    # Another key is not held back by this one's connections.
    other = await client.conns.connect(key.public_key, identity=Identity.generate())
    await first.close()
    third = await client.conns.connect(key.public_key, identity=me)
    for c in (second, other, third):
        await c.close()


async def test_a_listener_keeps_its_addresses_current(
    net: list[Peer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """While it listens, a node looks at its LAN and IPv6 addresses again every
    ADDRESS_REFRESH seconds (they change under a long-running listener), and stops when it
    no longer listens."""
    from dhtnode.transport import connections

    monkeypatch.setattr(connections, "ADDRESS_REFRESH", 0.05)
    server = net[-5]
    calls: list[float] = []
    real = server.conns._refresh_lan_addresses

    def counted() -> None:
        calls.append(time.monotonic())
        real()

    monkeypatch.setattr(server.conns, "_refresh_lan_addresses", counted)
    listening = await server.conns.listen(Identity.generate(), lambda conn: None)
    await asyncio.sleep(0.5)
    assert len(calls) >= 4
    await server.conns.unlisten(listening)
    await asyncio.sleep(0.2)
    settled = len(calls)
    await asyncio.sleep(0.3)
    assert len(calls) == settled
