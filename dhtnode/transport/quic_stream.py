"""QUIC between nodes: streams of a :class:`~dhtnode.transport.quic_conn.PeerConnection` in
asyncio's reader/writer shape.

Owns: :class:`QuicStreamWriter` (the sending half, with ``drain`` flow control against the
unacknowledged bytes) and :class:`_PeerStreams`, the stream half of ``PeerConnection``
(opening and accepting streams, feeding readers, refusing streams, resets, waking writers).
``_PeerStreams`` is a mixin of ``PeerConnection`` only: its methods run with ``self`` a
``PeerConnection`` and use that class's state.

Must not own or open sockets, log, or transmit by itself: datagrams leave only through the
connection's ``_transmit_soon``. Peer data reaches a stream only after the connection
authenticated the peer (``PeerConnection._process_events`` checks it).

aioquic private attributes used here (checked by ``tests/test_quic_bridge.py``):
``QuicConnection._streams`` with ``QuicStreamSender._buffer`` (send-side flow control in
``drain``).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, cast

from aioquic.quic import events

from dhtnode.transport.quic_errors import (
    STREAM_ABORTED,
    STREAM_CLOSED,
    STREAM_REFUSED,
    QuicStreamError,
)

if TYPE_CHECKING:
    import collections
    from collections.abc import Callable

    from aioquic.quic.connection import QuicConnection

    from dhtnode.transport.quic import QuicBridge
    from dhtnode.transport.quic_conn import PeerConnection
    from dhtnode.transport.quic_errors import QuicConnectionClosed

#: Peer-opened streams waiting for :meth:`PeerConnection.accept_stream`; beyond this new ones
#: are refused (reset), so a peer cannot queue streams an application never takes.
MAX_PENDING_ACCEPT = 64
#: ``drain()`` blocks while more than this many bytes of a stream are unacknowledged. Must be
#: well above the bandwidth-delay product of a fast path (1 MB = 80 Mbit/s at 100 ms RTT).
WRITE_HIGH_WATER = 1 << 20
#: ...and resumes once the stream's unacknowledged bytes are down to this.
WRITE_LOW_WATER = 1 << 18


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

    def abort(self, error_code: int = STREAM_ABORTED) -> None:
        """End the stream abruptly both ways: RESET_STREAM (data not yet delivered is
        discarded; the peer's reader raises) and STOP_SENDING (the peer's writer fails). What
        a TCP RST is to a TCP connection. Idempotent; a no-op on a dead connection."""
        if self._closing and self._error is not None:
            return
        self._closing = True
        self._eof_sent = True
        self._conn._abort_stream(self, error_code)

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



class _PeerStreams:
    """The stream half of :class:`~dhtnode.transport.quic_conn.PeerConnection` (a mixin)."""

    if TYPE_CHECKING:  # PeerConnection's state and methods these methods use
        _bridge: QuicBridge
        _quic: QuicConnection
        _loop: asyncio.AbstractEventLoop
        is_client: bool
        on_stream: Callable[[asyncio.StreamReader, QuicStreamWriter], None] | None
        _readers: dict[int, asyncio.StreamReader]
        _writers: dict[int, QuicStreamWriter]
        _fin_pending: set[QuicStreamWriter]
        _drain_waiting: set[QuicStreamWriter]
        _accept_queue: collections.deque[tuple[asyncio.StreamReader, QuicStreamWriter]]
        _accept_waiters: collections.deque[asyncio.Future[None]]
        _remote_seen: set[int]
        _remote_floor: int

        @property
        def closed(self) -> bool: ...
        def _check_usable(self) -> None: ...
        def _closed_error(self) -> QuicConnectionClosed: ...
        def _transmit_soon(self) -> None: ...

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


    # ----------------------------------------------------------------- streams (private)

    def _new_stream(self, stream_id: int) -> tuple[asyncio.StreamReader, QuicStreamWriter]:
        reader = asyncio.StreamReader(loop=self._loop)
        writer = QuicStreamWriter(cast("PeerConnection", self), stream_id)
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

    def _abort_stream(self, writer: QuicStreamWriter, error_code: int) -> None:
        sid = writer.stream_id
        stream = self._quic._streams.get(sid)
        if stream is not None and not self.closed:
            self._quic.reset_stream(sid, error_code)  # no-op once all data was acked
            if not stream.receiver.is_finished:
                self._quic.stop_stream(sid, error_code)
            self._transmit_soon()
        self._fin_pending.discard(writer)
        if self._writers.get(sid) is writer:
            del self._writers[sid]
        writer._fail(QuicStreamError(f"stream {sid} was aborted by us"))
        reader = self._readers.pop(sid, None)
        if reader is not None and not reader.at_eof():
            reader.feed_eof()

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
        if not self._fin_pending and not self._drain_waiting:
            return  # the common case, once per datagram
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
