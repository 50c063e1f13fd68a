"""Port forwarding by key: TCP connections carried as QUIC streams.

:class:`Exposer` serves a key (``Connections.listen``) and turns every QUIC stream a client
opens into a TCP connection to a local service; :class:`Forwarder` listens on a local TCP
port and turns every accepted TCP connection into one QUIC stream to the key's listener,
over one connection that it re-establishes when it ends. Bytes flow both ways with
back-pressure (``drain``), half-close (a FIN one way is a QUIC FIN and a TCP half-close on the
other side; the other direction stays open) and resets: a TCP RST (or any error) on one side
becomes RESET_STREAM + STOP_SENDING on the QUIC stream, and a reset QUIC stream becomes a TCP
RST (``SO_LINGER`` 0, then close) on the other side's TCP connection, so a cut transfer never
looks complete and an application sees a reset as a reset, not as a clean close.

Each stream starts with one byte, :data:`STREAM_OPEN`, that the forwarder sends at once: a
QUIC stream reaches the peer only with its first byte, so without it a service that speaks
first (SMTP, MySQL, VNC, FTP...) would wait for a client that waits for it, and the exposer
would not even connect to it.

Liveness: a forwarding or exposing connection is watched (``connection.watch_peer``), so a
peer that died without a word (SIGKILL, power loss) is noticed in seconds rather than at
QUIC's 30 s idle timeout, and the forwarder's next TCP connection connects afresh. A TCP
connection that arrives while the peer is silent but not yet given up on waits for one PING
answer (:data:`SUSPECT_PROBE_WAIT`) before it gets the connection; without one the forwarder
connects afresh at once.

Must not decide anything about connecting; it only moves bytes between streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

from dhtnode.crypto.identity import Identity
from dhtnode.errors import DhtnodeError
from dhtnode.transport.connection import PROBE_AFTER, Connection, watch_peer
from dhtnode.transport.connections import Connections, Server
from dhtnode.transport.quic import CLOSE_PEER_SILENT

#: Bytes moved per read: large enough for throughput, small enough to keep memory per
#: stream bounded (the writers' high-water marks bound the rest).
CHUNK = 65536
#: Seconds a TCP connect to the exposed service may take.
TCP_CONNECT_TIMEOUT = 10.0
#: The first byte of every forwarded stream (see the module doc); an exposer closes a stream
#: that starts otherwise (another protocol, or a forwarder that sends none).
STREAM_OPEN = b"\x01"
#: Seconds an exposer waits for a new stream's first byte.
STREAM_OPEN_TIMEOUT = 10.0
#: Seconds of silence from the peer after which the forwarder double-checks its connection
#: before giving it a new TCP connection: the liveness watch PINGs a silent peer every
#: ``PROBE_AFTER``, so a live peer is never silent this long.
SUSPECT_AFTER = 2 * PROBE_AFTER
#: Seconds a suspect connection's peer gets to answer a PING before the forwarder connects
#: afresh (rather than hand the TCP connection to a peer that may be dead for seconds more).
SUSPECT_PROBE_WAIT = 1.0
#: Seconds between looks for that answer.
_PROBE_POLL = 0.02


async def _answers(conn: Connection) -> bool:
    """False if ``conn`` is closed, or its peer has been silent for :data:`SUSPECT_AFTER` and
    does not answer a PING within :data:`SUSPECT_PROBE_WAIT`. A connection whose relay is
    being replaced counts as answering (the failover moves it or closes it)."""
    quic = conn.quic
    if quic.closed:
        return False
    if time.monotonic() - max(quic.last_rx, conn.moved_at) < SUSPECT_AFTER:
        return True
    if conn.relay is not None and not conn.relay.alive and conn.path == "relayed":
        return True
    sent = time.monotonic()
    quic.probe()
    while time.monotonic() - sent < SUSPECT_PROBE_WAIT and not quic.closed:
        if quic.last_rx >= sent:
            return True
        await asyncio.sleep(_PROBE_POLL)
    return False


#: ``struct linger`` with l_onoff=1, l_linger=0: close() then sends a RST, not a FIN.
_LINGER_RESET = struct.pack("ii", 1, 0)


def _abort(writer: Any) -> None:
    """End ``writer`` abruptly after an error or a reset of the other side: a TCP connection
    is reset (RST: its peer must not take a cut transfer for a complete one, nor a reset for a
    clean close); a QUIC stream is reset both ways."""
    if isinstance(writer, asyncio.StreamWriter):
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        writer.transport.abort()
    else:
        writer.abort()


async def pipe(
    reader: asyncio.StreamReader, writer: Any, on_error: Callable[[], None] | None = None
) -> None:
    """Copy ``reader`` to ``writer`` until EOF, then half-close ``writer``. On a reset or an
    error of either side, abort ``writer`` and call ``on_error``."""
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, DhtnodeError, OSError):
        _abort(writer)
        if on_error is not None:
            on_error()


async def splice(
    a: tuple[asyncio.StreamReader, Any], b: tuple[asyncio.StreamReader, Any]
) -> None:
    """Both directions between two (reader, writer) pairs; closes both writers at the end.
    A reset in either direction resets both sides (a TCP RST ends both of its directions)."""

    def reset_both() -> None:
        for w in (a[1], b[1]):
            with contextlib.suppress(Exception):
                _abort(w)

    try:
        await asyncio.gather(pipe(a[0], b[1], reset_both), pipe(b[0], a[1], reset_both))
    finally:
        for w in (a[1], b[1]):
            with contextlib.suppress(Exception):
                w.close()


class Exposer:
    """Serve ``identity``'s key; each stream becomes a TCP connection to ``target``."""

    def __init__(
        self,
        conns: Connections,
        identity: Identity,
        target: tuple[str, int],
        *,
        allow: Callable[[bytes], bool] | None,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self._conns = conns
        self._identity = identity
        self._target = target
        self._allow = allow
        self._on_event = on_event
        self._tasks: set[asyncio.Task[None]] = set()
        self._accepted: set[Connection] = set()
        self.server: Server | None = None
        self.streams = 0

    async def start(self) -> Server:
        self.server = await self._conns.listen(self._identity, self._on_connection,
                                               allow=self._allow)
        return self.server

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_connection(self, conn: Connection) -> None:
        self._accepted.add(conn)
        self._spawn(self._serve(conn))
        self._spawn(watch_peer(conn, self._on_event))

    async def _serve(self, conn: Connection) -> None:
        try:
            while True:
                try:
                    stream = await conn.accept_stream()
                except DhtnodeError:
                    return  # the connection ended
                self._spawn(self._one(stream))
        finally:
            self._accepted.discard(conn)

    async def _one(self, stream: tuple[asyncio.StreamReader, Any]) -> None:
        self.streams += 1
        try:
            first = await asyncio.wait_for(stream[0].readexactly(1), STREAM_OPEN_TIMEOUT)
        except (asyncio.IncompleteReadError, TimeoutError, DhtnodeError, ConnectionError):
            first = b""
        if first != STREAM_OPEN:
            if self._on_event:
                self._on_event("expose_stream_refused", {"first_byte": first.hex()})
            stream[1].close()
            return
        try:
            tcp = await asyncio.wait_for(
                asyncio.open_connection(*self._target), TCP_CONNECT_TIMEOUT
            )
        except (OSError, TimeoutError) as exc:
            if self._on_event:
                self._on_event("expose_connect_failed", {"target": f"{self._target[0]}:"
                               f"{self._target[1]}", "error": str(exc)})
            stream[1].abort()  # the client's TCP connection is reset, as a refused one is
            return
        await splice(stream, tcp)

    async def close(self) -> None:
        """Stop serving: withdraw the record and close every connection it accepted, so
        forwarders notice at once and reconnect to whoever serves the key next."""
        if self.server is not None:
            await self.server.close()
        conns = list(self._accepted)
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)


class Forwarder:
    """Listen on a local TCP address; each TCP connection becomes a stream to ``key``."""

    def __init__(
        self,
        conns: Connections,
        key: bytes,
        listen: tuple[str, int],
        *,
        identity: Identity | None = None,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self._conns = conns
        self._key = key
        self._listen = listen
        self._identity = identity
        self._on_event = on_event
        self._conn: Connection | None = None
        self._lock = asyncio.Lock()
        self._tcp: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.connects = 0

    async def start(self) -> tuple[str, int]:
        self._tcp = await asyncio.start_server(self._on_tcp, *self._listen)
        sock = self._tcp.sockets[0].getsockname()
        return (str(sock[0]), int(sock[1]))

    async def connection(self) -> Connection:
        """The connection to the key, (re)established when there is none or it ended."""
        async with self._lock:
            conn = self._conn
            if conn is not None and not await _answers(conn):
                await conn.quic.close(CLOSE_PEER_SILENT, "the peer did not answer a PING",
                                      wait=False)
            if self._conn is None or self._conn.quic.closed:
                self._conn = await self._conns.connect(self._key, identity=self._identity)
                self.connects += 1
                task = asyncio.get_running_loop().create_task(
                    watch_peer(self._conn, self._on_event)
                )
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                if self._on_event:
                    self._on_event("forward_connected", {"public_key": self._key.hex(),
                                                         "strategy": self._conn.strategy})
            return self._conn

    def _on_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._one((reader, writer)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _one(self, tcp: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        conn: Connection | None = None
        for attempt in range(2):
            try:
                conn = await self.connection()
                stream = await conn.open_stream()
                stream[1].write(STREAM_OPEN)  # the exposer connects to the service now
                break
            except Exception as exc:  # any error: the TCP client must not hang
                if attempt == 1 or not isinstance(exc, DhtnodeError):
                    if self._on_event:
                        self._on_event("forward_failed", {"public_key": self._key.hex(),
                                                          "error": str(exc) or repr(exc)})
                    tcp[1].close()
                    return
                if conn is not None and self._conn is conn:
                    # A stale connection: connect afresh once (unless another TCP
                    # connection has done so meanwhile: that one is kept).
                    self._conn = None
        await splice(tcp, stream)

    async def close(self) -> None:
        if self._tcp is not None:
            self._tcp.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._conn is not None:
            await self._conn.close()
