"""Port forwarding by key: TCP connections carried as QUIC streams.

:class:`Exposer` serves a key (``Connections.listen``) and turns every QUIC stream a client
opens into a TCP connection to a local service; :class:`Forwarder` listens on a local TCP
port and turns every accepted TCP connection into one QUIC stream to the key's listener,
over one connection that it re-establishes when it ends. Bytes flow both ways with
back-pressure (``drain``), half-close (EOF one way keeps the other open) and errors (a reset
on one side closes the other; a TCP side is reset, so a cut transfer never looks complete).

Each stream starts with one byte, :data:`STREAM_OPEN`, that the forwarder sends at once: a
QUIC stream reaches the peer only with its first byte, so without it a service that speaks
first (SMTP, MySQL, VNC, FTP...) would wait for a client that waits for it, and the exposer
would not even connect to it.

Must not decide anything about connecting; it only moves bytes between streams.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from dhtnode.crypto.identity import Identity
from dhtnode.errors import DhtnodeError
from dhtnode.transport.connections import Connection, Connections, Server

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


def _abort(writer: Any) -> None:
    """End ``writer`` after an error: a TCP connection is reset (its peer must not take a cut
    transfer for a complete one); a QUIC stream is closed."""
    if isinstance(writer, asyncio.StreamWriter):
        writer.transport.abort()
    else:
        writer.close()


async def pipe(reader: asyncio.StreamReader, writer: Any) -> None:
    """Copy ``reader`` to ``writer`` until EOF, then half-close ``writer``."""
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, DhtnodeError, OSError):
        _abort(writer)


async def splice(
    a: tuple[asyncio.StreamReader, Any], b: tuple[asyncio.StreamReader, Any]
) -> None:
    """Both directions between two (reader, writer) pairs; closes both writers at the end."""
    try:
        await asyncio.gather(pipe(a[0], b[1]), pipe(b[0], a[1]))
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
            stream[1].close()
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
            if self._conn is None or self._conn.quic.closed:
                self._conn = await self._conns.connect(self._key, identity=self._identity)
                self.connects += 1
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
