"""QuicBridge over real UDP sockets on loopback: mutual Ed25519 auth, streams, gating, paths.

Each test body is a coroutine run under plain asyncio and, where it matters, under uvloop
(``run``), so the uvloop clock trap cannot come back unnoticed. Traffic goes to 127.0.0.1 / ::1
only.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import importlib.util
import os
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import pytest
from aioquic import tls
from aioquic.asyncio.client import connect as aioquic_connect
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.stream import QuicStreamSender
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dhtnode.crypto.certs import NOT_AFTER, certificate_public_key, make_certificate
from dhtnode.crypto.identity import Identity
from dhtnode.transport.quic import (
    ALPN,
    CLOSE_AUTH_FAILED,
    CLOSE_SHUTDOWN,
    MAX_PENDING_ACCEPT,
    Expectation,
    PeerConnection,
    QuicBridge,
    QuicConnectError,
    QuicConnectionClosed,
    QuicExpectationLimit,
    QuicStreamError,
)
from dhtnode.wire.address import Address, normalize
from tests.loopnet import has_ipv6_loopback

LOOPS = ["asyncio", "uvloop"] if importlib.util.find_spec("uvloop") else ["asyncio"]


def run(body: Callable[[], Awaitable[None]], loop_kind: str = "asyncio") -> None:
    """Run ``body`` on a fresh loop of the given kind (a minute at most)."""
    factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
    if loop_kind == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(asyncio.wait_for(body(), 60))


class UdpPath(asyncio.DatagramProtocol):
    """One UDP socket: a DatagramPath for sending, and the bridge's feed for receiving."""

    def __init__(self, bridge: QuicBridge) -> None:
        self.bridge = bridge
        self.transport: asyncio.DatagramTransport | None = None
        self.drop_incoming = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if not self.drop_incoming:
            self.bridge.datagram_received(data, normalize(addr), self)

    def send(self, data: bytes, addr: Address) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(data, addr)

    @property
    def local(self) -> Address:
        assert self.transport is not None
        return normalize(self.transport.get_extra_info("sockname"))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def open_path(bridge: QuicBridge, host: str = "127.0.0.1") -> UdpPath:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_datagram_endpoint(
        lambda: UdpPath(bridge), local_addr=(host, 0)
    )
    return protocol


class Node:
    def __init__(self, **bridge_args: Any) -> None:
        self.stats: collections.Counter[str] = collections.Counter()
        self.events: list[tuple[str, dict[str, object]]] = []
        self.identity = Identity.generate()
        self.bridge = QuicBridge(
            self.stats, on_event=lambda n, f: self.events.append((n, f)), **bridge_args
        )
        self.paths: list[UdpPath] = []

    async def open(self, host: str = "127.0.0.1") -> UdpPath:
        path = await open_path(self.bridge, host)
        self.paths.append(path)
        return path

    @property
    def path(self) -> UdpPath:
        return self.paths[0]

    def expect_from(
        self, ip: str, allowed_key: bytes | None, *, seconds: float = 5.0
    ) -> tuple[Expectation, asyncio.Future[PeerConnection]]:
        accepted: asyncio.Future[PeerConnection] = asyncio.get_running_loop().create_future()

        def on_connection(conn: PeerConnection) -> None:
            if not accepted.done():
                accepted.set_result(conn)

        expectation = self.bridge.expect(
            ip,
            identity=self.identity,
            allowed_key=allowed_key,
            deadline=time.monotonic() + seconds,
            on_connection=on_connection,
        )
        return expectation, accepted

    def close(self) -> None:
        self.bridge.close()
        for path in self.paths:
            path.close()


async def make_pair(
    host: str = "127.0.0.1", **bridge_args: Any
) -> tuple[Node, Node, PeerConnection, PeerConnection]:
    server, client = Node(**bridge_args), Node(**bridge_args)
    await server.open(host)
    await client.open(host)
    _, accepted = server.expect_from(host, client.identity.public_key)
    conn = await client.bridge.connect(
        client.path,
        server.path.local,
        identity=client.identity,
        server_key=server.identity.public_key,
        timeout=5,
    )
    server_conn = await asyncio.wait_for(accepted, 5)
    return server, client, conn, server_conn


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def assert_empty(node: Node) -> None:
    assert node.bridge.table_sizes() == {
        "connections": 0,
        "cids": 0,
        "expectations": 0,
        "half_open": 0,
        "timers": 0,
    }, node.bridge.table_sizes()


async def echo_server(conn: PeerConnection, count: int = 1) -> None:
    for _ in range(count):
        reader, writer = await conn.accept_stream()
        writer.write(await reader.read())
        writer.write_eof()
        await writer.wait_closed()


# --------------------------------------------------------------------------- aioquic contract


def test_aioquic_private_attributes_still_exist() -> None:
    """dhtnode.transport.quic reaches into these; an aioquic upgrade must fail here first."""
    import aioquic

    assert aioquic.__version__.startswith("1.7."), aioquic.__version__
    assert callable(QuicConnection._initialize)
    context = tls.Context(is_client=False)
    assert context._request_client_certificate is False
    assert context._peer_certificate is None
    assert tls.State.SERVER_EXPECT_CLIENT_HELLO is not None
    quic = QuicConnection(configuration=QuicConfiguration(is_client=True))
    assert quic._close_event is None
    assert quic._streams == {}
    assert isinstance(quic._loss._rtt_smoothed, float)
    quic.connect(("peer", 0), now=0.0)
    assert isinstance(quic._spaces[tls.Epoch.ONE_RTT].largest_received_packet, int)
    assert isinstance(QuicStreamSender(stream_id=0, writable=True)._buffer, bytearray)


def test_certificate_roundtrip_and_foreign_keys() -> None:
    identity = Identity.generate()
    cert = make_certificate(identity)
    assert certificate_public_key(cert.certificate) == identity.public_key
    assert make_certificate(identity).certificate == cert.certificate  # deterministic
    assert cert.certificate.not_valid_after_utc == NOT_AFTER
    assert certificate_public_key(None) is None
    ec_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ec")])
    ec_cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ec_key.public_key())
        .serial_number(1)
        .not_valid_before(cert.certificate.not_valid_before_utc)
        .not_valid_after(NOT_AFTER)
        .sign(ec_key, hashes.SHA256())
    )
    assert certificate_public_key(ec_cert) is None


# --------------------------------------------------------------------------- happy paths


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_mutual_auth_echo(loop_kind: str) -> None:
    async def body() -> None:
        started = time.perf_counter()
        server, client, conn, server_conn = await make_pair()
        handshake_ms = (time.perf_counter() - started) * 1000
        try:
            assert conn.peer_key == server.identity.public_key
            assert server_conn.peer_key == client.identity.public_key
            assert conn.is_client and not server_conn.is_client
            assert server_conn.addr == client.path.local
            task = asyncio.create_task(echo_server(server_conn))
            reader, writer = await conn.open_stream()
            writer.write(b"hello over quic")
            writer.write_eof()
            assert await reader.read() == b"hello over quic"
            await writer.wait_closed()
            await task
            assert 0 < conn.rtt < 0.5
            assert conn.stats.bytes_out > 0 and conn.stats.bytes_in > 0
            assert client.stats["quic_connected"] == 1 and server.stats["quic_accepted"] == 1
            names = [name for name, _ in server.events]
            assert "quic_accepted" in names
            await conn.close()
            await server_conn.wait_closed()
            assert server_conn.close_code == 0
            print(f"\nhandshake incl. socket setup ({loop_kind}): {handshake_ms:.1f} ms")
        finally:
            server.close()
            client.close()
        assert_empty(server)
        assert_empty(client)

    run(body, loop_kind)


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback")
def test_mutual_auth_echo_ipv6() -> None:
    async def body() -> None:
        server, client, conn, server_conn = await make_pair("::1")
        try:
            assert server_conn.addr[0] == "::1"
            task = asyncio.create_task(echo_server(server_conn))
            reader, writer = await conn.open_stream()
            writer.write(b"v6")
            writer.write_eof()
            assert await reader.read() == b"v6"
            await task
        finally:
            server.close()
            client.close()

    run(body)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_bulk_transfer_5mb(loop_kind: str) -> None:
    payload = os.urandom(5 * 1024 * 1024)

    async def body() -> None:
        server, client, conn, server_conn = await make_pair()
        try:

            async def sink() -> None:
                reader, writer = await server_conn.accept_stream()
                digest = hashlib.sha256()
                total = 0
                while chunk := await reader.read(65536):
                    digest.update(chunk)
                    total += len(chunk)
                writer.write(total.to_bytes(8, "big") + digest.digest())
                writer.write_eof()
                await writer.wait_closed()

            task = asyncio.create_task(sink())
            started = time.perf_counter()
            reader, writer = await conn.open_stream()
            view = memoryview(payload)
            for offset in range(0, len(payload), 64 * 1024):
                writer.write(view[offset : offset + 64 * 1024])
                await writer.drain()
            writer.write_eof()
            answer = await reader.read()
            elapsed = time.perf_counter() - started
            await task
            assert int.from_bytes(answer[:8], "big") == len(payload)
            assert answer[8:] == hashlib.sha256(payload).digest()
            print(f"\n5 MB one stream ({loop_kind}): {len(payload) / elapsed / 1e6:.1f} MB/s")
        finally:
            server.close()
            client.close()

    run(body, loop_kind)


def test_peer_opens_stream_to_client_and_on_stream_callback() -> None:
    async def body() -> None:
        server, client, conn, server_conn = await make_pair()
        try:
            got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

            def on_stream(reader: asyncio.StreamReader, writer: Any) -> None:
                async def handle() -> None:
                    got.set_result(await reader.read())
                    writer.close()

                asyncio.get_running_loop().create_task(handle())

            conn.on_stream = on_stream
            reader, writer = await server_conn.open_stream()
            writer.write(b"from server")
            writer.write_eof()
            assert await asyncio.wait_for(got, 5) == b"from server"
            assert await reader.read() == b""
        finally:
            server.close()
            client.close()

    run(body)


# --------------------------------------------------------------------------- authentication


def test_wrong_server_key_is_a_clear_error() -> None:
    async def body() -> None:
        server, client = Node(), Node()
        await server.open()
        await client.open()
        _, accepted = server.expect_from("127.0.0.1", None)
        wrong = Identity.generate().public_key
        try:
            with pytest.raises(QuicConnectError) as info:
                await client.bridge.connect(
                    client.path,
                    server.path.local,
                    identity=client.identity,
                    server_key=wrong,
                    timeout=5,
                )
            message = str(info.value)
            assert f"presented key {server.identity.public_key.hex()}" in message
            assert f"expected {wrong.hex()}" in message
            await wait_until(lambda: not server.bridge.connections)
            await wait_until(lambda: not client.bridge.connections)
            assert not accepted.done()
            assert client.stats["quic_auth_refused"] == 1
        finally:
            server.close()
            client.close()

    run(body)


def test_client_without_certificate_is_refused() -> None:
    async def body() -> None:
        server = Node()
        await server.open()
        _, accepted = server.expect_from("127.0.0.1", None)
        host, port = server.path.local
        config = QuicConfiguration(
            is_client=True, alpn_protocols=[ALPN], verify_mode=ssl.CERT_NONE
        )
        try:
            async with aioquic_connect(host, port, configuration=config) as protocol:
                # The TLS handshake itself succeeds (aioquic lets a client without a
                # certificate through); the bridge closes the connection right after.
                await asyncio.wait_for(protocol.wait_closed(), 5)
                close_event = protocol._quic._close_event
                assert close_event is not None
                assert close_event.error_code == CLOSE_AUTH_FAILED
                assert "no Ed25519 certificate" in close_event.reason_phrase
            assert not accepted.done()
            assert server.stats["quic_auth_refused"] == 1
            await wait_until(lambda: not server.bridge.connections)
        finally:
            server.close()

    run(body)


def test_client_key_not_allowed_is_refused() -> None:
    async def body() -> None:
        server, client = Node(), Node()
        await server.open()
        await client.open()
        other = Identity.generate().public_key
        expectation, accepted = server.expect_from("127.0.0.1", other)
        try:
            with pytest.raises(QuicConnectError) as info:
                await client.bridge.connect(
                    client.path,
                    server.path.local,
                    identity=client.identity,
                    server_key=server.identity.public_key,
                    timeout=5,
                )
            assert f"client key {client.identity.public_key.hex()} is not allowed" in str(
                info.value
            )
            assert not accepted.done()
            assert expectation.active  # a refused client does not use the permission up
            assert server.stats["quic_auth_refused"] == 1
            await wait_until(lambda: not server.bridge.connections)
        finally:
            server.close()
            client.close()

    run(body)


# --------------------------------------------------------------------------- gating, garbage


def test_unexpected_cancelled_and_expired_initials_are_dropped() -> None:
    async def body() -> None:
        server, client = Node(), Node()
        await server.open()
        await client.open()

        async def attempt() -> None:
            with pytest.raises(QuicConnectError, match="timed out"):
                await client.bridge.connect(
                    client.path,
                    server.path.local,
                    identity=client.identity,
                    server_key=server.identity.public_key,
                    timeout=0.3,
                )

        try:
            await attempt()
            nobody = server.stats["drop_quic_unexpected"]
            assert nobody >= 1
            expectation, _ = server.expect_from("127.0.0.1", None)
            expectation.cancel()
            await attempt()
            assert server.stats["drop_quic_unexpected"] > nobody
            before = server.stats["drop_quic_unexpected"]
            server.expect_from("127.0.0.1", None, seconds=0.0)
            await attempt()
            assert server.stats["drop_quic_unexpected"] > before
            server.expect_from("192.0.2.1", None)  # a different IP does not help
            await attempt()
            assert server.stats["quic_accepted"] == 0
            assert not server.bridge.connections and not client.bridge.connections
            assert client.stats["quic_connect_timeout"] == 4
        finally:
            server.close()
            client.close()

    run(body)


def fake_initial(size: int) -> bytes:
    """A version-1 Initial with a valid header and a random (undecryptable) payload."""
    header = b"\xc3\x00\x00\x00\x01" + b"\x08" + os.urandom(8) + b"\x08" + os.urandom(8) + b"\x00"
    rest = size - len(header) - 2
    return header + (0x4000 | rest).to_bytes(2, "big") + os.urandom(rest)


def test_garbage_datagrams_are_counted_and_never_raise() -> None:
    async def body() -> None:
        node = Node()
        path = await node.open()
        node.expect_from("127.0.0.1", None)
        source = ("127.0.0.1", 40000)
        junk = [
            b"",
            b"\xc0",
            b"\x40",
            b"\xc3\x00\x00\x00\x01\xff",  # long header, DCID length beyond the maximum
            b"\x40" + os.urandom(40),  # short header, unknown connection id
            fake_initial(1300),  # well-formed header, but decrypts to nothing
            fake_initial(300),  # too small to be an Initial
            b"\xe3\x00\x00\x00\x01\x08" + os.urandom(60),  # Handshake for nobody
            b"\xc3\xff\x00\x00\x1d\x08" + os.urandom(1300),  # unsupported version
        ]
        junk += [os.urandom(n) for n in (1, 5, 20, 200, 1200, 1500) for _ in range(20)]
        try:
            for data in junk:
                node.bridge.datagram_received(data, source, path)
            await asyncio.sleep(0.05)
            dropped = sum(v for k, v in node.stats.items() if k.startswith("drop_quic_"))
            assert dropped == len(junk), node.stats
            assert node.stats["drop_quic_header"] >= 2
            assert node.stats["drop_quic_bad_initial"] >= 1
            assert node.stats["quic_internal_error"] == 0
            assert not node.bridge.connections
            assert node.bridge.table_sizes()["cids"] == 0
        finally:
            node.close()

    run(body)


def test_expectations_are_bounded() -> None:
    async def body() -> None:
        node = Node(max_expectations=3)
        try:
            held = [node.expect_from("127.0.0.1", None)[0] for _ in range(3)]
            with pytest.raises(QuicExpectationLimit, match="limit 3"):
                node.expect_from("127.0.0.1", None)
            held[0].cancel()
            node.expect_from("::ffff:127.0.0.1", None)  # normalised, fits again
            with pytest.raises(ValueError, match="not an IP"):
                node.expect_from("example.org", None)
        finally:
            node.close()
        assert_empty(node)

    run(body)


# --------------------------------------------------------------------------- lifetime


def test_idle_timeout_closes_both_sides() -> None:
    async def body() -> None:
        server, client, conn, server_conn = await make_pair(
            idle_timeout=0.5, keepalive_interval=None
        )
        try:
            with pytest.raises(QuicConnectionClosed, match="Idle timeout"):
                await asyncio.wait_for(server_conn.accept_stream(), 5)
            await asyncio.wait_for(conn.wait_closed(), 5)
            assert conn.closed and server_conn.closed
            assert_empty(server)
            assert_empty(client)
        finally:
            server.close()
            client.close()

    run(body)


def test_keepalive_keeps_an_idle_connection_open() -> None:
    async def body() -> None:
        server, client, conn, server_conn = await make_pair(
            idle_timeout=0.6, keepalive_interval=0.2
        )
        try:
            await asyncio.sleep(1.5)
            assert not conn.closed and not server_conn.closed
            assert conn.stats.pings_sent >= 3
            # A vanished peer is still reaped: stop the server's socket from delivering.
            server.path.drop_incoming = True
            client.path.drop_incoming = True
            await asyncio.wait_for(conn.wait_closed(), 5)
            await asyncio.wait_for(server_conn.wait_closed(), 5)
        finally:
            server.close()
            client.close()

    run(body)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_fifty_connects_leave_nothing_behind(loop_kind: str) -> None:
    async def body() -> None:
        server, client = Node(), Node()
        await server.open()
        await client.open()
        tasks_before = asyncio.all_tasks()
        try:
            started = time.perf_counter()
            handshakes: list[float] = []
            for i in range(50):
                _, accepted = server.expect_from("127.0.0.1", client.identity.public_key)
                connect_started = time.perf_counter()
                conn = await client.bridge.connect(
                    client.path,
                    server.path.local,
                    identity=client.identity,
                    server_key=server.identity.public_key,
                    timeout=5,
                )
                handshakes.append(time.perf_counter() - connect_started)
                server_conn = await asyncio.wait_for(accepted, 5)
                task = asyncio.create_task(echo_server(server_conn))
                reader, writer = await conn.open_stream()
                writer.write(b"ping %d" % i)
                writer.write_eof()
                assert await reader.read() == b"ping %d" % i
                await task
                await conn.close()
                await server_conn.wait_closed()
            elapsed = time.perf_counter() - started
            handshakes.sort()
            print(
                f"\n50 x (connect, echo, close) ({loop_kind}): {elapsed * 20:.1f} ms each; "
                f"connect() median {handshakes[25] * 1000:.1f} ms, max {handshakes[-1] * 1000:.1f}"
            )
            assert_empty(server)
            assert_empty(client)
            assert asyncio.all_tasks() == tasks_before
            assert server.stats["quic_closed"] == 50 and client.stats["quic_closed"] == 50
        finally:
            server.close()
            client.close()

    run(body, loop_kind)


def test_bridge_close_closes_everything_and_the_peer_notices() -> None:
    async def body() -> None:
        server, client, conn, _server_conn = await make_pair()
        try:
            reader, _writer = await conn.open_stream()
            server.bridge.close()
            assert_empty(server)
            with pytest.raises(QuicConnectionClosed, match="node shutting down"):
                await asyncio.wait_for(reader.read(), 5)
            await asyncio.wait_for(conn.wait_closed(), 5)
            assert conn.close_code == CLOSE_SHUTDOWN and conn.close_is_application
            assert_empty(client)
        finally:
            server.close()
            client.close()

    run(body)


# --------------------------------------------------------------------------- paths


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_set_path_moves_a_live_stream_to_another_socket(loop_kind: str) -> None:
    total = 3 * 1024 * 1024

    async def body() -> None:
        server, client, conn, server_conn = await make_pair()
        try:
            received = 0
            halfway = asyncio.Event()

            async def sink() -> bytes:
                nonlocal received
                reader, writer = await server_conn.accept_stream()
                digest = hashlib.sha256()
                while chunk := await reader.read(65536):
                    digest.update(chunk)
                    received += len(chunk)
                    if received >= total // 3:
                        halfway.set()
                writer.write(b"done")
                writer.write_eof()
                return digest.digest()

            task = asyncio.create_task(sink())
            payload = os.urandom(total)
            reader, writer = await conn.open_stream()

            async def source() -> None:
                for offset in range(0, total, 32 * 1024):
                    writer.write(payload[offset : offset + 32 * 1024])
                    await writer.drain()
                writer.write_eof()

            sending = asyncio.create_task(source())
            await asyncio.wait_for(halfway.wait(), 10)
            assert received < total
            # Move both ends to the client's second socket, then close the first one.
            old_path = client.path
            new_path = await client.open()
            conn.set_path(new_path, server.path.local)
            server_conn.set_path(server.path, new_path.local)
            old_path.close()
            await sending
            assert await reader.read() == b"done"
            assert await task == hashlib.sha256(payload).digest()
            assert server_conn.stats.datagrams_other_path > 0  # in flight during the switch
            assert [n for n, _ in client.events].count("quic_path_changed") == 1
        finally:
            server.close()
            client.close()

    run(body, loop_kind)


def test_datagrams_from_another_path_are_fed_but_do_not_move_the_connection() -> None:
    async def body() -> None:
        server, client, conn, server_conn = await make_pair()
        try:
            second = await client.open()
            conn.set_path(second, server.path.local)  # client sends from a new socket only
            task = asyncio.create_task(echo_server(server_conn))
            reader, writer = await conn.open_stream()
            writer.write(b"via second socket")
            writer.write_eof()
            # Replies still go to the first socket (the server's path did not move) and the
            # client bridge routes them to the connection by connection id.
            assert await reader.read() == b"via second socket"
            await task
            assert server_conn.addr == client.path.local
            assert server_conn.stats.datagrams_other_path > 0
            assert conn.stats.datagrams_other_path > 0
        finally:
            server.close()
            client.close()

    run(body)


def test_stream_closed_early_stops_the_peer() -> None:
    async def body() -> None:
        server, client, conn, server_conn = await make_pair()
        try:
            _reader, writer = await conn.open_stream()
            writer.write(b"x")
            peer_reader, peer_writer = await server_conn.accept_stream()
            assert await peer_reader.readexactly(1) == b"x"
            writer.close()  # FIN, and we no longer want the peer's data
            with pytest.raises(QuicStreamError, match="stopped reading"):
                for _ in range(200):
                    peer_writer.write(b"y" * 10000)
                    await peer_writer.drain()
                    await asyncio.sleep(0.005)
            assert peer_writer.is_closing()
            assert await peer_reader.read() == b""
            await asyncio.wait_for(writer.wait_closed(), 5)
            assert not conn.closed  # one stream's end leaves the connection alone
        finally:
            server.close()
            client.close()

    run(body)


def test_streams_beyond_the_accept_backlog_are_refused() -> None:
    async def body() -> None:
        server, client, conn, server_conn = await make_pair()
        try:
            opened = []
            for i in range(MAX_PENDING_ACCEPT + 6):
                reader, writer = await conn.open_stream()
                writer.write(b"%d" % i)
                opened.append((reader, writer))
            await wait_until(lambda: server.stats["quic_stream_refused"] == 6)
            await wait_until(lambda: all(r.exception() is not None for r, _ in opened[-6:]))
            assert all(r.exception() is None for r, _ in opened[:-6])
            assert isinstance(opened[-1][0].exception(), QuicStreamError)
            # The waiting ones are still there, in order.
            first_reader, _first_writer = await server_conn.accept_stream()
            assert await first_reader.readexactly(1) == b"0"
            assert not conn.closed
        finally:
            server.close()
            client.close()

    run(body)
