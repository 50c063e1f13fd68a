"""Port forwarding by key on loopback: a TCP service exposed under a key and reached through a
local forwarded port; many TCP connections at once over one QUIC connection, data intact,
half-close both ways, and a restart of the exposing side picked up without restarting the
forwarding side."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from dhtnode.crypto.identity import Identity
from dhtnode.transport.connection import PEER_DEAD_AFTER
from dhtnode.transport.forward import SUSPECT_AFTER, Exposer, Forwarder
from dhtnode.transport.quic import CLOSE_PEER_SILENT
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


@dataclass
class _Vanishing:
    """An exposer on net[-1] and a forwarder on net[-2]; :meth:`kill` makes the exposing node
    vanish without a word (its socket closes, no CONNECTION_CLOSE, as on SIGKILL) and
    :meth:`replace` exposes the same key from net[-3]."""

    net: list[Peer]
    key: Identity
    target: tuple[str, int]
    exposer: Exposer
    fwd: Forwarder
    port: int
    second: Exposer | None = None

    def kill(self) -> float:
        self.net[-1].ep.close()
        return time.monotonic()

    async def replace(self) -> None:
        self.second = Exposer(self.net[-3].conns, self.key, self.target, allow=None)
        await self.second.start()


@contextlib.asynccontextmanager
async def _vanishing_exposer(net: list[Peer]) -> AsyncIterator[_Vanishing]:
    """The rig of the dead-exposer tests, torn down whatever happens (a killed exposer's
    tasks are cancelled: its node can no longer close anything cleanly)."""
    service = await asyncio.start_server(_service, "127.0.0.1", 0)
    target = service.sockets[0].getsockname()[:2]
    key = Identity.generate()
    exposer = Exposer(net[-1].conns, key, target, allow=None)
    await exposer.start()
    fwd = Forwarder(net[-2].conns, key.public_key, ("127.0.0.1", 0))
    _, port = await fwd.start()
    rig = _Vanishing(net, key, target, exposer, fwd, port)
    try:
        yield rig
    finally:
        await fwd.close()
        if rig.second is not None:
            await rig.second.close()
        for t in list(exposer._tasks):
            t.cancel()
        service.close()


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


async def test_forward_notices_a_dead_exposer_in_seconds(net: list[Peer]) -> None:
    """The exposing node vanishes without a word (as on SIGKILL: its socket closes, no
    CONNECTION_CLOSE): the forwarder's liveness watch closes the connection within
    PEER_DEAD_AFTER (not QUIC's 30 s idle timeout), and the next TCP connection connects
    afresh to whoever serves the key now."""
    async with _vanishing_exposer(net) as rig:
        ans = await asyncio.wait_for(_fetch(rig.port, b"first"), 30)
        assert ans[32:] == PAYLOAD
        conn = await rig.fwd.connection()
        killed = rig.kill()
        await asyncio.wait_for(conn.wait_closed(), PEER_DEAD_AFTER + 5)
        took = time.monotonic() - killed
        print(f"dead exposer noticed after {took:.2f} s")
        assert conn.quic.close_code == CLOSE_PEER_SILENT
        assert took < PEER_DEAD_AFTER + 1.5
        await rig.replace()
        ans = await asyncio.wait_for(_fetch(rig.port, b"again"), 30)
        assert ans[:32] == hashlib.sha256(b"again").digest() and ans[32:] == PAYLOAD
        assert rig.fwd.connects == 2


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a crashing or refusing application does."""
    writer.get_extra_info("socket").setsockopt(
        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
    )
    writer.transport.abort()


async def _read_until_end(reader: asyncio.StreamReader) -> tuple[bytes, BaseException | None]:
    """Everything until EOF, or until the connection is reset: (data, the error or None)."""
    got = b""
    try:
        while data := await reader.read(65536):
            got += data
    except (ConnectionError, OSError) as exc:
        return got, exc
    return got, None


async def test_resets_cross_as_resets_and_fins_as_half_closes(net: list[Peer]) -> None:
    """A TCP RST from the service reaches the forwarded client as a RST (RESET_STREAM over
    QUIC), a RST from the client reaches the service as a RST, and a FIN stays a half-close
    both ways (the other direction keeps flowing)."""
    mode: asyncio.Queue[str] = asyncio.Queue()
    seen: asyncio.Queue[tuple[bytes, BaseException | None]] = asyncio.Queue()

    async def service(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        how = await mode.get()
        if how == "service-resets":
            await reader.readexactly(5)
            writer.write(b"partial")
            await writer.drain()
            await asyncio.sleep(0.2)
            _reset(writer)
        elif how == "client-resets":
            await seen.put(await _read_until_end(reader))
            writer.close()
        else:  # half-close: answer and FIN first, then keep reading
            writer.write(b"answer")
            await writer.drain()
            writer.write_eof()
            await seen.put(await _read_until_end(reader))
            writer.close()

    server = await asyncio.start_server(service, "127.0.0.1", 0)
    target = server.sockets[0].getsockname()[:2]
    key = Identity.generate()
    exposer = Exposer(net[-1].conns, key, target, allow=None)
    await exposer.start()
    fwd = Forwarder(net[-2].conns, key.public_key, ("127.0.0.1", 0))
    _, port = await fwd.start()
    try:
        # The service resets: the client sees a reset, not a clean end.
        await mode.put("service-resets")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"hello")
        got, err = await asyncio.wait_for(_read_until_end(reader), 20)
        assert isinstance(err, ConnectionResetError), (got, err)
        writer.close()

        # The client resets: the service sees a reset.
        await mode.put("client-resets")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"some bytes")
        await writer.drain()
        await asyncio.sleep(0.5)  # the bytes reach the service first
        _reset(writer)
        got, err = await asyncio.wait_for(seen.get(), 20)
        assert got == b"some bytes"
        assert isinstance(err, ConnectionResetError), (got, err)

        # FIN from the service first: the client reads to EOF and can still send.
        await mode.put("half-close")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        got, err = await asyncio.wait_for(_read_until_end(reader), 20)
        assert (got, err) == (b"answer", None)
        writer.write(b"after your FIN")
        await writer.drain()
        writer.write_eof()
        got, err = await asyncio.wait_for(seen.get(), 20)
        assert (got, err) == (b"after your FIN", None)
        writer.close()
    finally:
        await fwd.close()
        await exposer.close()
        server.close()


async def test_forward_checks_a_silent_connection_before_using_it(net: list[Peer]) -> None:
    """A TCP connection that arrives after the exposer died but before the liveness watch has
    given up: the forwarder PINGs the silent peer first and, without an answer, connects
    afresh at once instead of handing the TCP connection to the dead one."""
    async with _vanishing_exposer(net) as rig:
        assert (await asyncio.wait_for(_fetch(rig.port, b"first"), 30))[32:] == PAYLOAD
        conn = await rig.fwd.connection()
        killed = rig.kill()
        await rig.replace()
        await asyncio.sleep(max(0.0, killed + SUSPECT_AFTER + 0.2 - time.monotonic()))
        ans = await asyncio.wait_for(_fetch(rig.port, b"again"), 30)
        took = time.monotonic() - killed
        print(f"fetch through a fresh connection {took:.2f} s after the exposer died")
        assert ans[:32] == hashlib.sha256(b"again").digest() and ans[32:] == PAYLOAD
        assert rig.fwd.connects == 2
        assert conn.quic.close_code == CLOSE_PEER_SILENT
        assert conn.quic.close_reason == "the peer did not answer a PING"
