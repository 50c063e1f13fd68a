"""QUIC between nodes: one aioquic connection to a peer, driven sans-socket.

Owns: :class:`PeerConnection` (keep-alive, handshake deadline, mutual authentication by key
pinning at ``HandshakeCompleted``, close, the timer, and the *path* its datagrams currently
take), :class:`ConnectionStats` and the :class:`DatagramPath` protocol. Its streams live in
:mod:`dhtnode.transport.quic_stream`; the :class:`~dhtnode.transport.quic.QuicBridge` creates
connections and routes datagrams to them.

Must not own or open sockets: datagrams leave through a :class:`DatagramPath` and enter through
``PeerConnection._receive`` (called by the bridge). aioquic never sees a real address: each
connection has one fixed pseudo address for its whole life, so a path switch is invisible to
it. Must not log: it reports through the bridge's ``_emit`` and ``stats`` only. Must not trust
a peer before its certificate key has been pinned at ``HandshakeCompleted``. Time is
``time.monotonic()``, never ``loop.time()`` (see :mod:`dhtnode.transport.quic`).

aioquic private attributes used here (checked by ``tests/test_quic_bridge.py``):
``tls.Context._peer_certificate`` (pinning), ``QuicConnection._close_event`` (notice a close
before the 3-PTO closing period ends), ``QuicConnection._loss._rtt_smoothed`` (``rtt``) and
``QuicConnection._spaces[Epoch.ONE_RTT].largest_received_packet`` (whether a datagram from
another path carried an authenticated new packet, for ``on_other_path``).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from aioquic import tls
from aioquic.quic import events
from aioquic.quic.connection import QuicConnection

from dhtnode.crypto.certs import certificate_public_key
from dhtnode.transport.quic_errors import (
    CLOSE_AUTH_FAILED,
    CLOSE_HANDSHAKE_TIMEOUT,
    CLOSE_INTERNAL_ERROR,
    CLOSE_NO_ERROR,
    QuicConnectError,
    QuicConnectionClosed,
    QuicError,
)
from dhtnode.transport.quic_stream import QuicStreamWriter, _PeerStreams
from dhtnode.wire.address import Address, format_addr

if TYPE_CHECKING:
    from dhtnode.transport.quic import QuicBridge
    from dhtnode.transport.quic_expect import Expectation

#: ALPN every dhtnode QUIC connection negotiates; a peer speaking anything else is refused by
#: the TLS layer before any of our code runs.
ALPN = "dhtnode/1"
#: Seconds a connection may take from its first packet to pinned keys; a spoofed or stalled
#: Initial must not hold a half-open connection until the idle timeout.
HANDSHAKE_TIMEOUT = 10.0
#: Timers may fire this much early (uvloop rounds to 1 ms); treat them as due rather than
#: re-arming a zero-length timer in a loop.
TIMER_GRANULARITY = 0.001


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


class PeerConnection(_PeerStreams):
    """One authenticated QUIC connection to a peer. Made by :class:`QuicBridge` only.

    Its stream methods (``open_stream``, ``accept_stream`` and the private stream handling)
    are defined in :class:`~dhtnode.transport.quic_stream._PeerStreams`.
    """

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
        #: Called with (path, source) when a datagram from another path than the current one
        #: carried an authenticated new packet: the connection's owner decides whether to move
        #: there (the peer moved to a new relay). QUIC itself never moves.
        self.on_other_path: Callable[[DatagramPath, Address], None] | None = None
        #: Called for each stream the peer opens; when None they queue for accept_stream().
        self.on_stream: Callable[[asyncio.StreamReader, QuicStreamWriter], None] | None = None
        #: Why the connection ended: code, reason phrase, and whether the code is one of ours
        #: (``CLOSE_*``, application space) or a QUIC transport error code (RFC 9000 sec. 20).
        self.close_code: int | None = None
        self.close_reason = ""
        self.close_is_application = True
        self.created_at = time.monotonic()
        #: When the last datagram arrived from the peer, ``time.monotonic()`` (liveness
        #: checks above QUIC, e.g. port forwarding's, read it).
        self.last_rx = self.created_at
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

    def probe(self) -> None:
        """Send a PING now: after a path change its acknowledgement restarts loss recovery
        at once (packets lost on the old path are declared lost and sent again) instead of
        after a probe timeout that backed off while the old path was dead."""
        if self.closed or not self._authenticated:
            return
        self._quic.send_ping(next(self._ping_ids))
        self.stats.pings_sent += 1
        self._transmit()

    def _largest_received(self) -> int:
        space = self._quic._spaces.get(tls.Epoch.ONE_RTT)
        return -1 if space is None else int(space.largest_received_packet)

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

    # ----------------------------------------------------------------- state (private)

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

    # ----------------------------------------------------------------- I/O (private)

    def _receive(self, data: bytes, source: Address, path: DatagramPath) -> None:
        if self._finalized:
            return
        stats = self.stats
        stats.bytes_in += len(data)
        stats.datagrams_in += 1
        self.last_rx = now = time.monotonic()
        other = path is not self._path or source != self._addr
        if other:
            # QUIC authenticates it; whether to move there is the migration policy's call.
            stats.datagrams_other_path += 1
            largest = self._largest_received()
        try:
            self._quic.receive_datagram(data, self._pseudo_addr, now=now)
            self._process_events()
        except Exception as exc:  # hostile input must never escape into the socket layer
            self._internal_error(exc)
            return
        if other and self.on_other_path is not None and self._largest_received() > largest:
            self._bridge._call_user(self.on_other_path, path, source)
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
            send, addr, stats = self._path.send, self._addr, self.stats
            stats.datagrams_out += len(datagrams)
            for data, _pseudo in datagrams:
                stats.bytes_out += len(data)
                try:
                    send(data, addr)
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
