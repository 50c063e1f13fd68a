"""QUIC between nodes: every aioquic connection of a node, driven sans-socket.

Owns: the :class:`QuicBridge` (routing datagrams to connections by destination connection id,
gating which Initials may create a server connection, mutual Ed25519 authentication by key
pinning, one timer per connection) and :class:`PeerConnection` (streams in asyncio's
reader/writer shape, keep-alive, close, and the *path* its datagrams currently take).

Must not own or open sockets: datagrams leave through a :class:`DatagramPath` and enter through
:meth:`QuicBridge.datagram_received`. aioquic never sees a real address: each connection has one
fixed pseudo address for its whole life, so a path switch (relay <-> direct) is invisible to it
and aioquic neither starts path validation nor drops datagrams from an unexpected source. Must
not log: it reports through the optional ``on_event`` callback and the ``stats`` counter only.
Must not trust a peer before its certificate key has been pinned at ``HandshakeCompleted``.

Time is ``time.monotonic()``, never ``loop.time()``: uvloop's loop clock has 1 ms resolution,
and fed to aioquic it cut one-stream throughput about 20-fold (``/work/shared/deps-facts.md``).

aioquic private attributes this module relies on (``tests/test_quic_bridge.py`` checks that
they still exist, so an aioquic upgrade fails loudly): ``QuicConnection._initialize`` (to ask
the client for a certificate via ``tls.Context._request_client_certificate``),
``tls.Context._peer_certificate`` (pinning), ``QuicConnection._close_event`` (notice a close
before the 3-PTO closing period ends), ``QuicConnection._streams`` with
``QuicStreamSender._buffer`` (send-side flow control in ``drain``), and
``QuicConnection._loss._rtt_smoothed`` (``rtt``).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from aioquic import tls
from aioquic.buffer import Buffer  # type: ignore[attr-defined]  # re-exported, no __all__
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicPacketType, pull_quic_header

from dhtnode.crypto.certs import NodeCertificate, certificate_public_key, make_certificate
from dhtnode.crypto.identity import PUBLIC_KEY_LEN, Identity
from dhtnode.errors import DhtnodeError
from dhtnode.wire.address import Address, format_addr, normalize

#: ALPN every dhtnode QUIC connection negotiates; a peer speaking anything else is refused by
#: the TLS layer before any of our code runs.
ALPN = "dhtnode/1"
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
#: Seconds a connection may take from its first packet to pinned keys; a spoofed or stalled
#: Initial must not hold a half-open connection until the idle timeout.
HANDSHAKE_TIMEOUT = 10.0
#: Pending expectations, all peers together: each is small, but a flood of hole-punch
#: requests must not grow memory without bound.
MAX_EXPECTATIONS = 1024
#: Server connections that have not finished their handshake yet, all peers together. Each
#: costs a TLS handshake (CPU) and some kilobytes; an expected IP can be spoofed.
MAX_HALF_OPEN = 256
#: Half-open server connections from one IP, so one expected peer cannot use up the budget.
MAX_HALF_OPEN_PER_IP = 8
#: Peer-opened streams waiting for :meth:`PeerConnection.accept_stream`; beyond this new ones
#: are refused (reset), so a peer cannot queue streams an application never takes.
MAX_PENDING_ACCEPT = 64
#: ``drain()`` blocks while more than this many bytes of a stream are unacknowledged. Must be
#: well above the bandwidth-delay product of a fast path (1 MB = 80 Mbit/s at 100 ms RTT).
WRITE_HIGH_WATER = 1 << 20
#: ...and resumes once the stream's unacknowledged bytes are down to this.
WRITE_LOW_WATER = 1 << 18
#: Initial connection-level receive window. aioquic doubles it as data arrives; starting
#: larger than its 1 MB default avoids stalls in the first round trips of a bulk transfer.
INITIAL_MAX_DATA = 4 << 20
#: Initial per-stream receive window (see :data:`INITIAL_MAX_DATA`).
INITIAL_MAX_STREAM_DATA = 2 << 20
#: Timers may fire this much early (uvloop rounds to 1 ms); treat them as due rather than
#: re-arming a zero-length timer in a loop.
TIMER_GRANULARITY = 0.001
#: Node certificates kept, keyed by public key. A node normally has one identity; this only
#: bounds a caller that passes many.
MAX_CACHED_CERTIFICATES = 16

# Application error codes carried in CONNECTION_CLOSE and RESET_STREAM / STOP_SENDING.
#: Normal close.
CLOSE_NO_ERROR = 0x0
#: The peer's certificate key was not the pinned / an allowed one, or it sent none.
CLOSE_AUTH_FAILED = 0x1
#: The node is shutting down (:meth:`QuicBridge.close`).
CLOSE_SHUTDOWN = 0x2
#: The handshake did not finish in time.
CLOSE_HANDSHAKE_TIMEOUT = 0x3
#: aioquic raised on input it should have handled: the connection is abandoned.
CLOSE_INTERNAL_ERROR = 0x4
#: A stream was refused (too many waiting to be accepted, or unidirectional).
STREAM_REFUSED = 0x10
#: The application closed its writer before reading everything the peer sent.
STREAM_CLOSED = 0x11

EventCallback = Callable[[str, dict[str, object]], None]


class QuicError(DhtnodeError):
    """Base class of the QUIC layer's errors."""


class QuicConnectError(QuicError):
    """An outgoing QUIC connection could not be established and authenticated."""


class QuicConnectionClosed(QuicError):
    """The connection ended; raised by stream operations and ``accept_stream`` afterwards."""

    def __init__(self, message: str, error_code: int = CLOSE_NO_ERROR, reason: str = "") -> None:
        super().__init__(message)
        self.error_code = error_code
        self.reason = reason


class QuicStreamError(QuicError):
    """A stream was reset by the peer, asked to stop sending, or used after write_eof/close."""


class QuicExpectationLimit(QuicError):
    """Too many pending :meth:`QuicBridge.expect` calls."""


class DatagramPath(Protocol):
    """Where a connection's datagrams go: a UDP socket, later a relay. Must not raise for
    ordinary network errors (UDP is lossy; QUIC retransmits)."""

    def send(self, data: bytes, addr: Address) -> None: ...


@dataclass(slots=True)
class ConnectionStats:
    """Per-connection traffic counters (UDP payload bytes, all packets included)."""

    bytes_in: int = 0
    bytes_out: int = 0
    datagrams_in: int = 0
    datagrams_out: int = 0
    #: Datagrams that arrived from a (path, address) other than the current one.
    datagrams_other_path: int = 0
    pings_sent: int = 0


class Expectation:
    """Permission for one incoming QUIC connection from ``peer_ip`` until ``deadline``."""

    __slots__ = (
        "_bridge",
        "_done",
        "allowed_key",
        "deadline",
        "identity",
        "on_connection",
        "peer_ip",
    )

    def __init__(
        self,
        bridge: QuicBridge,
        peer_ip: str,
        identity: Identity,
        allowed_key: bytes | None,
        deadline: float,
        on_connection: Callable[[PeerConnection], None],
    ) -> None:
        self._bridge = bridge
        self._done = False
        self.peer_ip = peer_ip
        self.identity = identity
        self.allowed_key = allowed_key
        self.deadline = deadline
        self.on_connection = on_connection

    @property
    def active(self) -> bool:
        """Not yet used, cancelled or expired."""
        return not self._done and time.monotonic() < self.deadline

    def cancel(self) -> None:
        """Withdraw the permission. A handshake already under way is refused at its end."""
        if not self._done:
            self._done = True
            self._bridge._drop_expectation(self)

    def __repr__(self) -> str:
        key = self.allowed_key.hex()[:16] if self.allowed_key else "any"
        return f"Expectation(peer_ip={self.peer_ip}, allowed_key={key}, done={self._done})"


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


class QuicStreamWriter:
    """The sending half of a bidirectional QUIC stream, shaped like ``asyncio.StreamWriter``."""

    __slots__ = ("_closing", "_conn", "_eof_sent", "_error", "_finished", "_stream_id", "_waiters")

    def __init__(self, conn: PeerConnection, stream_id: int) -> None:
        self._conn = conn
        self._stream_id = stream_id
        self._eof_sent = False
        self._closing = False
        self._finished = False  # all data and the FIN acknowledged, or the stream is dead
        self._error: BaseException | None = None
        self._waiters: list[asyncio.Future[None]] = []

    @property
    def stream_id(self) -> int:
        return self._stream_id

    @property
    def connection(self) -> PeerConnection:
        return self._conn

    def get_extra_info(self, name: str, default: object = None) -> object:
        if name == "stream_id":
            return self._stream_id
        if name == "peer_key":
            return self._conn.peer_key
        return default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data``; call :meth:`drain` to wait for buffer space."""
        if self._error is not None:
            raise self._error
        if self._eof_sent:
            raise QuicStreamError(
                f"stream {self._stream_id}: write() after write_eof() or close()"
            )
        if data:
            self._conn._send_stream(self, bytes(data), end_stream=False)

    def writelines(self, data: list[bytes]) -> None:
        for chunk in data:
            self.write(chunk)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """Send FIN after the queued data. Reading continues."""
        if self._eof_sent or self._error is not None:
            return
        self._eof_sent = True
        self._conn._send_stream(self, b"", end_stream=True)

    async def drain(self) -> None:
        """Wait while more than :data:`WRITE_HIGH_WATER` bytes are unacknowledged.
        Raises if the stream or the connection failed."""
        if self._error is not None:
            raise self._error
        if self._conn._unacked(self._stream_id) <= WRITE_HIGH_WATER:
            return
        while self._error is None and self._conn._unacked(self._stream_id) > WRITE_LOW_WATER:
            await self._wait()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Finish sending (FIN) and stop reading: data the peer still sends is discarded."""
        if self._closing:
            return
        self._closing = True
        self.write_eof()
        self._conn._stop_reading(self._stream_id)

    def is_closing(self) -> bool:
        return self._closing or self._error is not None

    async def wait_closed(self) -> None:
        """Wait until the peer acknowledged everything including the FIN, or the stream or
        connection ended. Does not raise: errors surface in :meth:`drain` and :meth:`write`."""
        while not self._finished:
            await self._wait()

    async def _wait(self) -> None:
        waiter = self._conn._loop.create_future()
        self._waiters.append(waiter)
        self._conn._drain_waiting.add(self)
        try:
            await waiter
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._finished = True
        self._wake()


class PeerConnection:
    """One authenticated QUIC connection to a peer. Made by :class:`QuicBridge` only."""

    def __init__(
        self,
        bridge: QuicBridge,
        quic: QuicConnection,
        loop: asyncio.AbstractEventLoop,
        path: DatagramPath,
        addr: Address,
        *,
        is_client: bool,
        expected_key: bytes | None = None,
        candidates: list[Expectation] | None = None,
    ) -> None:
        self._bridge = bridge
        self._quic = quic
        self._loop = loop
        self._path = path
        self._addr = addr
        self.is_client = is_client
        #: The peer's Ed25519 public key; set (and pinned) before the connection is handed out.
        self.peer_key: bytes = b""
        self.stats = ConnectionStats()
        #: Called for each stream the peer opens; when None they queue for accept_stream().
        self.on_stream: Callable[[asyncio.StreamReader, QuicStreamWriter], None] | None = None
        #: Why the connection ended: code, reason phrase, and whether the code is one of ours
        #: (``CLOSE_*``, application space) or a QUIC transport error code (RFC 9000 sec. 20).
        self.close_code: int | None = None
        self.close_reason = ""
        self.close_is_application = True
        self.created_at = time.monotonic()
        self._pseudo_addr = (f"dhtnode-quic-{next(bridge._pseudo_ids)}", 0)
        self._expected_key = expected_key
        self._candidates = candidates or []
        self._authenticated = False
        self._closing = False
        self._finalized = False
        self._local_close = False
        self._half_open_ip: str | None = None
        self._cids: set[bytes] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._tx_handle: asyncio.Handle | None = None
        self._last_tx = time.monotonic()
        self._handshake_deadline = self.created_at + HANDSHAKE_TIMEOUT
        self._ping_ids = itertools.count(1)
        self._auth_ping: int | None = None
        self._ready: asyncio.Future[None] = loop.create_future()
        self._closed_event = asyncio.Event()
        self._readers: dict[int, asyncio.StreamReader] = {}
        self._writers: dict[int, QuicStreamWriter] = {}
        self._fin_pending: set[QuicStreamWriter] = set()
        self._drain_waiting: set[QuicStreamWriter] = set()
        self._accept_queue: collections.deque[tuple[asyncio.StreamReader, QuicStreamWriter]] = (
            collections.deque()
        )
        self._accept_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._remote_seen: set[int] = set()
        self._remote_floor = 1 if is_client else 0  # lowest peer bidi stream id not yet seen

    # ----------------------------------------------------------------- public

    @property
    def path(self) -> DatagramPath:
        return self._path

    @property
    def addr(self) -> Address:
        """The peer's real address on the current path."""
        return self._addr

    @property
    def closed(self) -> bool:
        """True once the connection is closing or gone; nothing can be sent any more."""
        return self._closing or self._finalized

    @property
    def rtt(self) -> float:
        """Smoothed round-trip time in seconds (aioquic's loss recovery estimate)."""
        return float(self._quic._loss._rtt_smoothed)

    def set_path(self, path: DatagramPath, addr: Address) -> None:
        """Send all further datagrams through ``path`` to ``addr``. aioquic does not notice."""
        if path is self._path and addr == self._addr:
            return
        old = self._addr
        self._path = path
        self._addr = addr
        self._bridge._emit(
            "quic_path_changed",
            {"peer_key": self.peer_key.hex(), "old": format_addr(old), "new": format_addr(addr)},
        )

    async def open_stream(self) -> tuple[asyncio.StreamReader, QuicStreamWriter]:
        """Open a bidirectional stream."""
        self._check_usable()
        stream_id = self._quic.get_next_available_stream_id(is_unidirectional=False)
        # aioquic creates the stream (and advances the next id) on first send.
        self._quic.send_stream_data(stream_id, b"")
        return self._new_stream(stream_id)

    async def accept_stream(self) -> tuple[asyncio.StreamReader, QuicStreamWriter]:
        """The next stream the peer opened. Raises :class:`QuicConnectionClosed` once closed."""
        while not self._accept_queue:
            if self.closed:
                raise self._closed_error()
            waiter = self._loop.create_future()
            self._accept_waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._accept_waiters:
                    self._accept_waiters.remove(waiter)
        return self._accept_queue.popleft()

    async def close(
        self, error_code: int = CLOSE_NO_ERROR, reason: str = "", *, wait: bool = True
    ) -> None:
        """Close cleanly: send CONNECTION_CLOSE and wait out the closing period (3 PTO, ~90 ms
        on a LAN), in which a lost CLOSE is sent again. ``wait=False`` forgets the connection
        at once (a one-shot command about to exit: the peer times out if the CLOSE is lost)."""
        if not self._finalized and not self._closing:
            self._local_close = True
            self._quic.close(error_code=error_code, reason_phrase=reason)
            self._transmit()
        if not wait:
            self._finalize()
            return
        await self.wait_closed()

    async def wait_closed(self) -> None:
        await self._closed_event.wait()

    def __repr__(self) -> str:
        role = "client" if self.is_client else "server"
        key = self.peer_key.hex()[:16] or "?"
        state = "closed" if self.closed else "open"
        return f"PeerConnection({role}, {format_addr(self._addr)}, key={key}, {state})"

    # ----------------------------------------------------------------- streams (private)

    def _check_usable(self) -> None:
        if self.closed:
            raise self._closed_error()
        if not self._authenticated:
            raise QuicError("the connection is not authenticated yet")

    def _closed_error(self) -> QuicConnectionClosed:
        code = self.close_code if self.close_code is not None else CLOSE_NO_ERROR
        who = "by us" if self._local_close else "by the peer or on idle timeout"
        reason = self.close_reason or "no reason given"
        kind = "application" if self.close_is_application else "transport"
        return QuicConnectionClosed(
            f"QUIC connection to {format_addr(self._addr)} closed {who}: {reason} "
            f"({kind} code {code:#x})",
            code,
            self.close_reason,
        )

    def _new_stream(self, stream_id: int) -> tuple[asyncio.StreamReader, QuicStreamWriter]:
        reader = asyncio.StreamReader(loop=self._loop)
        writer = QuicStreamWriter(self, stream_id)
        self._readers[stream_id] = reader
        self._writers[stream_id] = writer
        return reader, writer

    def _send_stream(self, writer: QuicStreamWriter, data: bytes, *, end_stream: bool) -> None:
        if self.closed:
            exc = self._closed_error()
            writer._fail(exc)
            raise exc
        try:
            self._quic.send_stream_data(writer.stream_id, data, end_stream=end_stream)
        except (ValueError, RuntimeError) as exc:  # reset by STOP_SENDING, or discarded
            err = QuicStreamError(f"stream {writer.stream_id} can no longer send: {exc}")
            writer._fail(err)
            self._writers.pop(writer.stream_id, None)
            raise err from None
        if end_stream:
            self._fin_pending.add(writer)
        self._transmit_soon()

    def _unacked(self, stream_id: int) -> int:
        stream = self._quic._streams.get(stream_id)
        return len(stream.sender._buffer) if stream is not None else 0

    def _stop_reading(self, stream_id: int) -> None:
        reader = self._readers.pop(stream_id, None)
        if reader is None or self.closed:
            return
        if not reader.at_eof():
            reader.feed_eof()
            stream = self._quic._streams.get(stream_id)
            if stream is not None and not stream.receiver.is_finished:
                self._quic.stop_stream(stream_id, STREAM_CLOSED)
                self._transmit_soon()

    def _on_stream_data(self, event: events.StreamDataReceived) -> None:
        sid = event.stream_id
        reader = self._readers.get(sid)
        if reader is None:
            if not self._is_new_remote_stream(sid):
                return  # we stopped reading it; late data is dropped
            if sid & 0x2:  # unidirectional: not part of the protocol
                self._quic.stop_stream(sid, STREAM_REFUSED)
                self._bridge.stats["quic_stream_refused"] += 1
                return
            reader, writer = self._new_stream(sid)
            if self.on_stream is not None:
                self._bridge._call_user(self.on_stream, reader, writer)
            elif len(self._accept_queue) >= MAX_PENDING_ACCEPT:
                self._refuse_stream(sid)
                return
            else:
                self._accept_queue.append((reader, writer))
                while self._accept_waiters:
                    waiter = self._accept_waiters.popleft()
                    if not waiter.done():
                        waiter.set_result(None)
                        break
        if event.data:
            reader.feed_data(event.data)
        if event.end_stream:
            reader.feed_eof()
            self._readers.pop(sid, None)

    def _is_new_remote_stream(self, sid: int) -> bool:
        """True the first time a peer-initiated stream id is seen. Ids below a floor are
        remembered implicitly, so the set holds only ids seen out of order."""
        peer_bit = 1 if self.is_client else 0  # bit 0 of a stream id: 1 = server-initiated
        if (sid & 0x1) != peer_bit or sid < self._remote_floor or sid in self._remote_seen:
            return False
        if sid & 0x2:
            return True  # unidirectional: refused, not tracked
        self._remote_seen.add(sid)
        while self._remote_floor in self._remote_seen:
            self._remote_seen.discard(self._remote_floor)
            self._remote_floor += 4
        return True

    def _refuse_stream(self, sid: int) -> None:
        self._readers.pop(sid, None)
        self._writers.pop(sid, None)
        self._quic.stop_stream(sid, STREAM_REFUSED)
        self._quic.reset_stream(sid, STREAM_REFUSED)
        self._bridge.stats["quic_stream_refused"] += 1

    def _on_stream_reset(self, sid: int, error_code: int) -> None:
        reader = self._readers.pop(sid, None)
        if reader is not None and not reader.at_eof():
            reader.set_exception(
                QuicStreamError(f"stream {sid} was reset by the peer (code {error_code:#x})")
            )

    def _on_stop_sending(self, sid: int, error_code: int) -> None:
        # aioquic has already reset our sending side.
        writer = self._writers.pop(sid, None)
        if writer is not None:
            writer._fail(
                QuicStreamError(f"stream {sid}: the peer stopped reading (code {error_code:#x})")
            )
            self._fin_pending.discard(writer)

    def _after_receive(self) -> None:
        """Wake writers whose buffers drained and finish writers whose FIN was acked."""
        for writer in list(self._fin_pending):
            stream = self._quic._streams.get(writer.stream_id)
            if stream is None or stream.sender.is_finished:
                self._fin_pending.discard(writer)
                writer._finished = True
                if self._writers.get(writer.stream_id) is writer:
                    del self._writers[writer.stream_id]
                writer._wake()
        if self._drain_waiting:
            waiting, self._drain_waiting = self._drain_waiting, set()
            for writer in waiting:
                if writer._finished or self._unacked(writer.stream_id) <= WRITE_LOW_WATER:
                    writer._wake()
                else:
                    self._drain_waiting.add(writer)

    # ----------------------------------------------------------------- I/O (private)

    def _receive(self, data: bytes, source: Address, path: DatagramPath) -> None:
        if self._finalized:
            return
        self.stats.bytes_in += len(data)
        self.stats.datagrams_in += 1
        if path is not self._path or source != self._addr:
            # QUIC authenticates it; whether to move there is the migration policy's call.
            self.stats.datagrams_other_path += 1
        try:
            self._quic.receive_datagram(data, self._pseudo_addr, now=time.monotonic())
            self._process_events()
        except Exception as exc:  # hostile input must never escape into the socket layer
            self._internal_error(exc)
            return
        self._after_receive()
        self._transmit_soon()

    def _transmit_soon(self) -> None:
        # Coalesces every write and datagram of one loop iteration into one
        # datagrams_to_send() call, which packs them into fewer, fuller packets.
        if self._tx_handle is None and not self._finalized:
            self._tx_handle = self._loop.call_soon(self._transmit)

    def _transmit(self) -> None:
        if self._tx_handle is not None:
            self._tx_handle.cancel()
            self._tx_handle = None
        if self._finalized:
            return
        now = time.monotonic()
        try:
            datagrams = self._quic.datagrams_to_send(now=now)
        except Exception as exc:
            self._internal_error(exc)
            return
        if datagrams:
            path, addr = self._path, self._addr
            for data, _pseudo in datagrams:
                self.stats.bytes_out += len(data)
                self.stats.datagrams_out += 1
                try:
                    path.send(data, addr)
                except OSError:
                    self._bridge.stats["quic_send_error"] += 1
            self._last_tx = now
        self._check_closing()
        self._arm_timer()

    def _next_wakeup(self) -> float | None:
        at = self._quic.get_timer()
        if self._closing:
            return at
        if not self._authenticated:
            extra = self._handshake_deadline
        elif self._bridge.keepalive_interval is not None:
            extra = self._last_tx + self._bridge.keepalive_interval
        else:
            return at
        return extra if at is None else min(at, extra)

    def _arm_timer(self) -> None:
        if self._finalized:
            return
        at = self._next_wakeup()
        if self._timer is not None:
            assert self._timer_at is not None
            if at is not None and self._timer_at <= at:
                # An early wake-up is harmless (it re-arms); cancelling and re-creating a
                # timer handle for every packet is not.
                return
            self._timer.cancel()
            self._timer = None
            self._timer_at = None
        if at is not None:
            self._timer_at = at
            self._timer = self._loop.call_later(max(0.0, at - time.monotonic()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        if self._finalized:
            return
        now = time.monotonic()
        if not self._authenticated and now >= self._handshake_deadline:
            self._bridge.stats["quic_handshake_timeout"] += 1
            self._abort(CLOSE_HANDSHAKE_TIMEOUT, "handshake timed out")
            return
        try:
            quic_at = self._quic.get_timer()
            if quic_at is not None and now + TIMER_GRANULARITY >= quic_at:
                self._quic.handle_timer(now=max(now, quic_at))
            if (
                self._authenticated
                and not self._closing
                and self._bridge.keepalive_interval is not None
                and now + TIMER_GRANULARITY >= self._last_tx + self._bridge.keepalive_interval
            ):
                self._quic.send_ping(next(self._ping_ids))
                self.stats.pings_sent += 1
            self._process_events()
        except Exception as exc:
            self._internal_error(exc)
            return
        self._after_receive()
        self._transmit()

    # ----------------------------------------------------------------- events (private)

    def _process_events(self) -> None:
        quic = self._quic
        while not self._finalized:
            event = quic.next_event()
            if event is None:
                break
            if isinstance(event, events.StreamDataReceived):
                if self._authenticated and not self._closing:
                    self._on_stream_data(event)
            elif isinstance(event, events.ConnectionIdIssued):
                self._bridge._add_cid(event.connection_id, self)
            elif isinstance(event, events.ConnectionIdRetired):
                self._bridge._remove_cid(event.connection_id, self)
            elif isinstance(event, events.HandshakeCompleted):
                self._on_handshake(event)
            elif isinstance(event, events.PingAcknowledged):
                if event.uid == self._auth_ping and not self._ready.done():
                    self._auth_ping = None
                    self._ready.set_result(None)
            elif isinstance(event, events.StreamReset):
                self._on_stream_reset(event.stream_id, event.error_code)
            elif isinstance(event, events.StopSendingReceived):
                self._on_stop_sending(event.stream_id, event.error_code)
            elif isinstance(event, events.ConnectionTerminated):
                self._notice_closing(event.error_code, event.reason_phrase, event.frame_type)
                self._finalize()
        self._check_closing()

    def _on_handshake(self, event: events.HandshakeCompleted) -> None:
        if self._closing:
            return
        if event.alpn_protocol != ALPN:
            self._refuse(f"peer negotiated ALPN {event.alpn_protocol!r}, expected {ALPN!r}")
            return
        key = certificate_public_key(self._quic.tls._peer_certificate)
        if self.is_client:
            expected = self._expected_key
            assert expected is not None
            if key != expected:
                shown = key.hex() if key is not None else "no Ed25519 key"
                self._refuse(f"server presented key {shown}, expected {expected.hex()}")
                return
            self.peer_key = key
            self._authenticated = True
            # connect() returns only once the server has acknowledged a packet sent after our
            # Finished: a server that refuses our certificate closes instead of acknowledging.
            self._auth_ping = next(self._ping_ids)
            self._quic.send_ping(self._auth_ping)
            return
        if key is None:
            self._refuse("client presented no Ed25519 certificate")
            return
        pending = any(not e._done for e in self._candidates)
        expectation = self._bridge._claim_expectation(self._candidates, key)
        self._candidates = []
        if expectation is None:
            if pending:
                self._refuse(f"client key {key.hex()} is not allowed")
            else:
                self._refuse("no expectation left for this client (cancelled or used up)")
            return
        self.peer_key = key
        self._authenticated = True
        self._bridge._end_half_open(self)
        self._bridge.stats["quic_accepted"] += 1
        self._bridge._emit(
            "quic_accepted", {"peer_key": key.hex(), "addr": format_addr(self._addr)}
        )
        self._bridge._call_user(expectation.on_connection, self)

    def _refuse(self, why: str) -> None:
        self._bridge.stats["quic_auth_refused"] += 1
        self._bridge._emit(
            "quic_auth_refused",
            {"addr": format_addr(self._addr), "client": self.is_client, "why": why},
        )
        if self.is_client and not self._ready.done():
            self._ready.set_exception(QuicConnectError(why))
        self._local_close = True
        self._quic.close(error_code=CLOSE_AUTH_FAILED, reason_phrase=why)

    def _check_closing(self) -> None:
        if not self._closing and not self._finalized:
            close_event = self._quic._close_event
            if close_event is not None:
                self._notice_closing(
                    close_event.error_code, close_event.reason_phrase, close_event.frame_type
                )

    def _notice_closing(self, error_code: int, reason: str, frame_type: int | None) -> None:
        """The connection can no longer carry data: fail everything waiting on it."""
        if self._closing:
            return
        self._closing = True
        self.close_code = error_code
        self.close_reason = reason
        # aioquic reports an APPLICATION_CLOSE with no frame type, a transport close with one.
        self.close_is_application = frame_type is None
        self._bridge._end_half_open(self)
        exc = self._closed_error()
        for reader in self._readers.values():
            if not reader.at_eof():
                reader.set_exception(exc)
        self._readers.clear()
        for writer in self._writers.values():
            writer._fail(exc)
        self._writers.clear()
        self._fin_pending.clear()
        self._drain_waiting.clear()
        for waiter in self._accept_waiters:
            if not waiter.done():
                waiter.set_result(None)  # accept_stream() sees closed and raises
        self._accept_waiters.clear()
        if self.is_client and not self._ready.done():  # only connect() awaits it
            self._ready.set_exception(
                QuicConnectError(
                    f"{format_addr(self._addr)} closed the connection during the handshake: "
                    f"{reason or 'no reason given'} "
                    f"({'application' if frame_type is None else 'transport'} code {error_code:#x})"
                )
            )

    def _finalize(self) -> None:
        """Drop every trace of the connection: tables, timer, waiters."""
        if self._finalized:
            return
        if not self._closing:
            self._notice_closing(CLOSE_NO_ERROR, "", None)
        self._finalized = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = None
        if self._tx_handle is not None:
            self._tx_handle.cancel()
            self._tx_handle = None
        self._accept_queue.clear()
        self._candidates = []
        self._bridge._forget(self)
        self._closed_event.set()

    def _abort(self, error_code: int, reason: str) -> None:
        """Tell the peer (best effort) and drop the connection now, without a closing period."""
        if self._finalized:
            return
        if not self._closing:
            self._local_close = True
            try:
                self._quic.close(error_code=error_code, reason_phrase=reason)
                for data, _pseudo in self._quic.datagrams_to_send(now=time.monotonic()):
                    self._path.send(data, self._addr)
            except Exception:
                self._bridge.stats["quic_send_error"] += 1
            self._notice_closing(error_code, reason, None)
        self._finalize()

    def _internal_error(self, exc: Exception) -> None:
        self._bridge.stats["quic_internal_error"] += 1
        self._bridge._emit(
            "quic_internal_error", {"addr": format_addr(self._addr), "error": repr(exc)}
        )
        self._abort(CLOSE_INTERNAL_ERROR, "internal error")


class QuicBridge:
    """Every QUIC connection of one node, fed by the node's sockets and paths.

    ``stats`` is the node's shared counter; drops are counted there (``drop_quic_*``).
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

    def expect(
        self,
        peer_ip: str,
        *,
        identity: Identity,
        allowed_key: bytes | None,
        deadline: float,
        on_connection: Callable[[PeerConnection], None],
    ) -> Expectation:
        """Allow one incoming connection from ``peer_ip`` until ``deadline`` (monotonic).

        The client must present a certificate; with ``allowed_key`` its key must equal it.
        ``on_connection`` is called once the client is authenticated. The expectation is used
        up by the first connection that authenticates against it.
        """
        try:
            ip = normalize((peer_ip, 0))[0]
        except ValueError:
            raise ValueError(f"expect(): {peer_ip!r} is not an IP address") from None
        if allowed_key is not None and len(allowed_key) != PUBLIC_KEY_LEN:
            raise ValueError(
                f"expect(): allowed_key must be a {PUBLIC_KEY_LEN}-byte Ed25519 public key, "
                f"got {len(allowed_key)} bytes"
            )
        if self._closed:
            raise QuicError("the QUIC bridge is closed")
        if self._expectation_count >= self.max_expectations:
            self._prune_expectations()
            if self._expectation_count >= self.max_expectations:
                raise QuicExpectationLimit(
                    f"{self._expectation_count} QUIC connections are already expected (limit "
                    f"{self.max_expectations}); cancel unused ones or wait for them to expire"
                )
        expectation = Expectation(self, ip, identity, allowed_key, deadline, on_connection)
        self._expectations.setdefault(ip, []).append(expectation)
        self._expectation_count += 1
        return expectation

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

    def _live_expectations(self, ip: str) -> list[Expectation]:
        pending = self._expectations.get(ip)
        if not pending:
            return []
        now = time.monotonic()
        live = [e for e in pending if not e._done and now < e.deadline]
        if len(live) != len(pending):
            self._expectation_count -= len(pending) - len(live)
            for e in pending:
                if e not in live:
                    e._done = True
            if live:
                self._expectations[ip] = live
            else:
                del self._expectations[ip]
        return live

    def _prune_expectations(self) -> None:
        for ip in list(self._expectations):
            self._live_expectations(ip)

    def _drop_expectation(self, expectation: Expectation) -> None:
        pending = self._expectations.get(expectation.peer_ip)
        if pending and expectation in pending:
            pending.remove(expectation)
            self._expectation_count -= 1
            if not pending:
                del self._expectations[expectation.peer_ip]

    def _claim_expectation(self, candidates: list[Expectation], key: bytes) -> Expectation | None:
        """Use up the best expectation ``key`` satisfies: a pinned one before an open one.
        Expiry after the Initial arrived does not matter; the handshake was allowed then."""
        usable = [e for e in candidates if not e._done]
        chosen = next((e for e in usable if e.allowed_key == key), None)
        if chosen is None:
            chosen = next((e for e in usable if e.allowed_key is None), None)
        if chosen is not None:
            chosen._done = True
            self._drop_expectation(chosen)
        return chosen

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
