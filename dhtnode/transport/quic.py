"""QUIC between nodes: every aioquic connection of a node, driven sans-socket.

Owns: the :class:`QuicBridge` (routing datagrams to connections by destination connection id,
gating which Initials may create a server connection, mutual Ed25519 authentication by key
pinning, one timer per connection) and :class:`PeerConnection` (streams in asyncio's
reader/writer shape, keep-alive, close, and the *path* its datagrams currently take).

The layer is split by idea; this module holds the bridge, the QUIC configuration and the
public names (every name below is importable from here, whichever file defines it):

* ``quic.py``: :class:`QuicBridge` (routing, Initial gating, configuration, connect, close).
* ``quic_expect.py``: :class:`Expectation` and the bridge's expectation bookkeeping.
* ``quic_conn.py``: :class:`PeerConnection` (handshake, pinning, I/O, timer, close),
  :class:`ConnectionStats`, :class:`DatagramPath`.
* ``quic_stream.py``: :class:`QuicStreamWriter` and the stream half of ``PeerConnection``.
* ``quic_errors.py``: the application error codes and the :class:`QuicError` family.

Must not own or open sockets: datagrams leave through a :class:`DatagramPath` and enter through
:meth:`QuicBridge.datagram_received`. aioquic never sees a real address: each connection has one
fixed pseudo address for its whole life, so a path switch (relay <-> direct) is invisible to it
and aioquic neither starts path validation nor drops datagrams from an unexpected source. Must
not log: it reports through the optional ``on_event`` callback and the ``stats`` counter only.
Must not trust a peer before its certificate key has been pinned at ``HandshakeCompleted``.

Time is ``time.monotonic()``, never ``loop.time()``: uvloop's loop clock has 1 ms resolution,
and fed to aioquic it cut one-stream throughput about 20-fold (``/work/shared/deps-facts.md``).

aioquic private attributes this layer relies on (``tests/test_quic_bridge.py`` checks that
they still exist, so an aioquic upgrade fails loudly): ``QuicConnection._initialize`` (to ask
the client for a certificate via ``tls.Context._request_client_certificate``, here),
``tls.Context._peer_certificate`` (pinning, ``quic_conn.py``), ``QuicConnection._close_event``
(notice a close before the 3-PTO closing period ends, ``quic_conn.py``),
``QuicConnection._streams`` with ``QuicStreamSender._buffer`` (send-side flow control in
``drain``, ``quic_stream.py``), ``QuicConnection._loss._rtt_smoothed`` (``rtt``,
``quic_conn.py``), and ``QuicConnection._spaces[Epoch.ONE_RTT].largest_received_packet``
(``on_other_path``, ``quic_conn.py``).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import ssl
import time
from collections.abc import Callable

from aioquic import tls
from aioquic.buffer import Buffer  # type: ignore[attr-defined]  # re-exported, no __all__
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicPacketType, pull_quic_header

from dhtnode.crypto.certs import NodeCertificate, make_certificate
from dhtnode.crypto.identity import PUBLIC_KEY_LEN, Identity
from dhtnode.transport.quic_conn import (
    ALPN,
    HANDSHAKE_TIMEOUT,
    TIMER_GRANULARITY,
    ConnectionStats,
    DatagramPath,
    PeerConnection,
)
from dhtnode.transport.quic_errors import (
    CLOSE_AUTH_FAILED,
    CLOSE_HANDSHAKE_TIMEOUT,
    CLOSE_INTERNAL_ERROR,
    CLOSE_NO_ERROR,
    CLOSE_PEER_SILENT,
    CLOSE_RELAY_LOST,
    CLOSE_SHUTDOWN,
    STREAM_ABORTED,
    STREAM_CLOSED,
    STREAM_REFUSED,
    QuicConnectError,
    QuicConnectionClosed,
    QuicError,
    QuicExpectationLimit,
    QuicStreamError,
)
from dhtnode.transport.quic_expect import MAX_EXPECTATIONS, Expectation, _BridgeExpectations
from dhtnode.transport.quic_stream import (
    MAX_PENDING_ACCEPT,
    WRITE_HIGH_WATER,
    WRITE_LOW_WATER,
    QuicStreamWriter,
)
from dhtnode.wire.address import Address, format_addr

__all__ = [
    "ALPN",
    "CID_LENGTH",
    "CLOSE_AUTH_FAILED",
    "CLOSE_HANDSHAKE_TIMEOUT",
    "CLOSE_INTERNAL_ERROR",
    "CLOSE_NO_ERROR",
    "CLOSE_PEER_SILENT",
    "CLOSE_RELAY_LOST",
    "CLOSE_SHUTDOWN",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_KEEPALIVE_INTERVAL",
    "HANDSHAKE_TIMEOUT",
    "INITIAL_MAX_DATA",
    "INITIAL_MAX_STREAM_DATA",
    "MAX_CACHED_CERTIFICATES",
    "MAX_EXPECTATIONS",
    "MAX_HALF_OPEN",
    "MAX_HALF_OPEN_PER_IP",
    "MAX_PENDING_ACCEPT",
    "SMALLEST_INITIAL_DATAGRAM",
    "STREAM_ABORTED",
    "STREAM_CLOSED",
    "STREAM_REFUSED",
    "TIMER_GRANULARITY",
    "WRITE_HIGH_WATER",
    "WRITE_LOW_WATER",
    "ConnectionStats",
    "DatagramPath",
    "EventCallback",
    "Expectation",
    "PeerConnection",
    "QuicBridge",
    "QuicConnectError",
    "QuicConnectionClosed",
    "QuicError",
    "QuicExpectationLimit",
    "QuicStreamError",
    "QuicStreamWriter",
]

#: Length of the connection ids we issue. Short-header packets do not carry it, so every
#: connection of a bridge must use the same length for routing to parse them.
CID_LENGTH = 8
#: RFC 9000 section 14.1: a server only answers an Initial in a datagram of at least this size
#: (anti-amplification); smaller ones cannot start a connection.
SMALLEST_INITIAL_DATAGRAM = 1200
#: Seconds without any packet before a connection is dropped. Keep-alive PINGs keep a live
#: peer's connection open indefinitely; this only reaps dead peers.
DEFAULT_IDLE_TIMEOUT = 30.0
#: Seconds of silence after which a PING is sent. Linux UDP conntrack (and many home NATs)
#: forget a mapping after 30 s; 10 s leaves room for two lost PINGs.
DEFAULT_KEEPALIVE_INTERVAL = 10.0
#: Server connections that have not finished their handshake yet, all peers together. Each
#: costs a TLS handshake (CPU) and some kilobytes; an expected IP can be spoofed.
MAX_HALF_OPEN = 256
#: Half-open server connections from one IP, so one expected peer cannot use up the budget.
MAX_HALF_OPEN_PER_IP = 8
#: Initial connection-level receive window. aioquic doubles it as data arrives; starting
#: larger than its 1 MB default avoids stalls in the first round trips of a bulk transfer.
INITIAL_MAX_DATA = 4 << 20
#: Initial per-stream receive window (see :data:`INITIAL_MAX_DATA`).
INITIAL_MAX_STREAM_DATA = 2 << 20
#: Node certificates kept, keyed by public key. A node normally has one identity; this only
#: bounds a caller that passes many.
MAX_CACHED_CERTIFICATES = 16

EventCallback = Callable[[str, dict[str, object]], None]


class _ServerQuicConnection(QuicConnection):
    """aioquic's server connection, made to ask the client for a certificate.

    aioquic has no public switch for it; its TLS context is created inside ``_initialize`` when
    the first Initial arrives, so this is the one place to set the flag before the ClientHello
    is answered. A client may still answer with no certificate: :class:`PeerConnection` refuses
    that at ``HandshakeCompleted``.
    """

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        self.tls._request_client_certificate = True


class QuicBridge(_BridgeExpectations):
    """Every QUIC connection of one node, fed by the node's sockets and paths.

    ``stats`` is the node's shared counter; drops are counted there (``drop_quic_*``).
    :meth:`expect` and the expectation bookkeeping are defined in
    :class:`~dhtnode.transport.quic_expect._BridgeExpectations`.
    """

    def __init__(
        self,
        stats: collections.Counter[str],
        *,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        keepalive_interval: float | None = DEFAULT_KEEPALIVE_INTERVAL,
        max_expectations: int = MAX_EXPECTATIONS,
        max_datagram_size: int = SMALLEST_INITIAL_DATAGRAM,
        on_event: EventCallback | None = None,
    ) -> None:
        if keepalive_interval is not None and keepalive_interval >= idle_timeout:
            raise ValueError(
                f"keepalive_interval ({keepalive_interval} s) must be below idle_timeout "
                f"({idle_timeout} s), or the connection idles out between keep-alives"
            )
        self.stats = stats
        self.idle_timeout = idle_timeout
        self.keepalive_interval = keepalive_interval
        self.max_expectations = max_expectations
        self.max_datagram_size = max_datagram_size
        self._on_event = on_event
        self._by_cid: dict[bytes, PeerConnection] = {}
        self._connections: set[PeerConnection] = set()
        self._expectations: dict[str, list[Expectation]] = {}
        self._expectation_count = 0
        self._half_open: collections.Counter[str] = collections.Counter()
        self._certs: dict[bytes, NodeCertificate] = {}
        self._server_configs: dict[bytes, QuicConfiguration] = {}
        self._pseudo_ids = itertools.count(1)
        self._closed = False

    # ----------------------------------------------------------------- public

    @property
    def connections(self) -> tuple[PeerConnection, ...]:
        """Every live connection, authenticated or still in its handshake."""
        return tuple(self._connections)

    def table_sizes(self) -> dict[str, int]:
        """Sizes of the internal tables, for leak checks and the status command."""
        return {
            "connections": len(self._connections),
            "cids": len(self._by_cid),
            "expectations": self._expectation_count,
            "half_open": sum(self._half_open.values()),
            "timers": sum(1 for c in self._connections if c._timer is not None),
        }

    def datagram_received(self, data: bytes, source: Address, path: DatagramPath) -> None:
        """Feed one QUIC datagram that arrived from ``source`` over ``path``. Never raises."""
        if len(data) > CID_LENGTH and data[0] & 0xC0 == 0x40:
            # The hot path: a short-header (1-RTT) packet, fixed bit set. Its destination id
            # sits right after the first byte, exactly where pull_quic_header reads it, and
            # it is never an Initial; skip the generic parse (aioquic parses it again anyway).
            conn = self._by_cid.get(data[1 : 1 + CID_LENGTH])
            if conn is not None:
                conn._receive(data, source, path)
            else:
                self.stats["drop_quic_unknown_cid"] += 1
            return
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=CID_LENGTH)
        except ValueError:  # includes aioquic's BufferReadError
            self.stats["drop_quic_header"] += 1
            return
        conn = self._by_cid.get(header.destination_cid)
        if conn is not None:
            conn._receive(data, source, path)
            return
        if header.packet_type != QuicPacketType.INITIAL:
            self.stats["drop_quic_unknown_cid"] += 1
            return
        if len(data) < SMALLEST_INITIAL_DATAGRAM:
            self.stats["drop_quic_short_initial"] += 1
            return
        try:
            self._accept_initial(data, header.destination_cid, header.version, source, path)
        except Exception as exc:  # a bug here must not take the socket layer down
            self.stats["quic_internal_error"] += 1
            self._emit("quic_internal_error", {"addr": format_addr(source), "error": repr(exc)})

    async def connect(
        self,
        path: DatagramPath,
        addr: Address,
        *,
        identity: Identity,
        server_key: bytes,
        timeout: float,
    ) -> PeerConnection:
        """Connect to ``addr`` through ``path`` and pin the server's key to ``server_key``.

        Returns once both sides are authenticated. Raises :class:`QuicConnectError`.
        """
        if len(server_key) != PUBLIC_KEY_LEN:
            raise ValueError(
                f"connect(): server_key must be a {PUBLIC_KEY_LEN}-byte Ed25519 public key, "
                f"got {len(server_key)} bytes"
            )
        if self._closed:
            raise QuicConnectError("the QUIC bridge is closed")
        loop = asyncio.get_running_loop()
        quic = QuicConnection(configuration=self._configuration(identity, is_client=True))
        conn = PeerConnection(
            self, quic, loop, path, addr, is_client=True, expected_key=server_key
        )
        # The timeout below fires first and raises the clearer error.
        conn._handshake_deadline = conn.created_at + timeout + 1.0
        self._connections.add(conn)
        self._add_cid(quic.host_cid, conn)
        quic.connect(conn._pseudo_addr, now=time.monotonic())
        conn._transmit()
        try:
            await asyncio.wait_for(conn._ready, timeout)
        except TimeoutError:
            conn._abort(CLOSE_HANDSHAKE_TIMEOUT, "handshake timed out")
            self.stats["quic_connect_timeout"] += 1
            raise QuicConnectError(
                f"QUIC handshake with {format_addr(addr)} timed out after {timeout:g} s: the "
                "peer did not answer or does not expect us (is it told to expect this IP?)"
            ) from None
        except asyncio.CancelledError:
            conn._abort(CLOSE_HANDSHAKE_TIMEOUT, "connect cancelled")
            raise
        except QuicConnectError:
            self.stats["quic_connect_failed"] += 1
            raise
        self.stats["quic_connected"] += 1
        self._emit("quic_connected", {"peer_key": server_key.hex(), "addr": format_addr(addr)})
        return conn

    def close(self) -> None:
        """Close every connection now (CONNECTION_CLOSE sent best effort, no closing period)
        and drop all expectations. Idempotent."""
        self._closed = True
        for conn in list(self._connections):
            conn._abort(CLOSE_SHUTDOWN, "node shutting down")
        for pending in list(self._expectations.values()):
            for expectation in pending:
                expectation._done = True
        self._expectations.clear()
        self._expectation_count = 0

    # ----------------------------------------------------------------- private

    def _configuration(self, identity: Identity, *, is_client: bool) -> QuicConfiguration:
        if not is_client:
            config = self._server_configs.get(identity.public_key)
            if config is not None:
                return config
        cert = self._certs.get(identity.public_key)
        if cert is None:
            if len(self._certs) >= MAX_CACHED_CERTIFICATES:
                self._certs.clear()
                self._server_configs.clear()
            cert = self._certs[identity.public_key] = make_certificate(identity)
        config = QuicConfiguration(
            is_client=is_client,
            alpn_protocols=[ALPN],
            # No CA: trust is the pinned key, checked at HandshakeCompleted. CertificateVerify
            # still proves the peer holds the private key of the certificate it sent.
            verify_mode=ssl.CERT_NONE,
            certificate=cert.certificate,
            private_key=cert.private_key,
            idle_timeout=self.idle_timeout,
            connection_id_length=CID_LENGTH,
            max_data=INITIAL_MAX_DATA,
            max_stream_data=INITIAL_MAX_STREAM_DATA,
            max_datagram_size=self.max_datagram_size,
        )
        if not is_client:
            self._server_configs[identity.public_key] = config
        return config

    def _accept_initial(
        self,
        data: bytes,
        original_cid: bytes,
        version: int | None,
        source: Address,
        path: DatagramPath,
    ) -> None:
        ip = source[0]
        candidates = self._live_expectations(ip)
        if not candidates or self._closed:
            self.stats["drop_quic_unexpected"] += 1
            return
        if (
            sum(self._half_open.values()) >= MAX_HALF_OPEN
            or self._half_open[ip] >= MAX_HALF_OPEN_PER_IP
        ):
            self.stats["drop_quic_half_open"] += 1
            return
        identity = candidates[0].identity
        config = self._configuration(identity, is_client=False)
        if version not in config.supported_versions:
            self.stats["drop_quic_version"] += 1
            return
        quic = _ServerQuicConnection(
            configuration=config, original_destination_connection_id=original_cid
        )
        conn = PeerConnection(
            self,
            quic,
            asyncio.get_running_loop(),
            path,
            source,
            is_client=False,
            candidates=[c for c in candidates if c.identity.public_key == identity.public_key],
        )
        self._connections.add(conn)
        self._half_open[ip] += 1
        conn._half_open_ip = ip
        # The client keeps addressing us by the id it chose until it sees ours.
        self._add_cid(original_cid, conn)
        self._add_cid(quic.host_cid, conn)
        conn._receive(data, source, path)
        context: tls.Context | None = getattr(quic, "tls", None)  # made by the 1st Initial
        if not conn._finalized and (
            context is None or context.state == tls.State.SERVER_EXPECT_CLIENT_HELLO
        ):
            # Nothing decrypted: junk or a spoofed Initial from an expected IP. Drop it now
            # rather than hold a half-open slot until the handshake timeout. (Our clients send
            # the whole ClientHello in their first datagram, so a real one never lands here.)
            self.stats["drop_quic_bad_initial"] += 1
            conn._finalize()

    def _end_half_open(self, conn: PeerConnection) -> None:
        ip = conn._half_open_ip
        if ip is not None:
            conn._half_open_ip = None
            self._half_open[ip] -= 1
            if self._half_open[ip] <= 0:
                del self._half_open[ip]

    def _add_cid(self, cid: bytes, conn: PeerConnection) -> None:
        if conn._finalized:
            return
        # A colliding id (chosen by a client) keeps its first owner; the newcomer's packets
        # carrying it then fail to decrypt there and are dropped by aioquic.
        if self._by_cid.setdefault(cid, conn) is conn:
            conn._cids.add(cid)

    def _remove_cid(self, cid: bytes, conn: PeerConnection) -> None:
        if self._by_cid.get(cid) is conn:
            del self._by_cid[cid]
        conn._cids.discard(cid)

    def _forget(self, conn: PeerConnection) -> None:
        for cid in conn._cids:
            if self._by_cid.get(cid) is conn:
                del self._by_cid[cid]
        conn._cids.clear()
        self._end_half_open(conn)
        if conn in self._connections:
            self._connections.discard(conn)
            self.stats["quic_closed"] += 1
            self._emit(
                "quic_closed",
                {
                    "peer_key": conn.peer_key.hex(),
                    "addr": format_addr(conn.addr),
                    "code": conn.close_code,
                    "reason": conn.close_reason,
                    "bytes_in": conn.stats.bytes_in,
                    "bytes_out": conn.stats.bytes_out,
                    "seconds": round(time.monotonic() - conn.created_at, 3),
                },
            )

    def _emit(self, name: str, fields: dict[str, object]) -> None:
        if self._on_event is not None:
            try:
                self._on_event(name, fields)
            except Exception:
                self.stats["quic_on_event_error"] += 1

    def _call_user(self, callback: Callable[..., None], *args: object) -> None:
        try:
            callback(*args)
        except Exception as exc:  # an application bug must not break the connection's I/O
            self.stats["quic_callback_error"] += 1
            self._emit("quic_callback_error", {"error": repr(exc)})
