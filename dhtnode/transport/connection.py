"""One connection to a peer, by its key: :class:`Connection` (what ``connect()`` returns and
``listen()`` hands over: streams, close, the path it runs on), and :func:`watch_peer`, which
notices a peer that died without a word.

Owns no sockets and decides no path: ``connections.py`` makes connections and moves them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dhtnode.transport.quic import CLOSE_PEER_SILENT, PeerConnection
from dhtnode.transport.relaypath import RelayPath
from dhtnode.wire.address import Address

#: Seconds without a datagram from the peer after which a watched connection (``watch_peer``)
#: sends a PING, then one per such interval while silent; a live peer answers in a round trip.
PROBE_AFTER = 1.0
#: Seconds without a datagram from the peer, PINGs notwithstanding, after which a watched
#: connection is closed as dead: three or four PINGs lost in a row. Longer than a relayed
#: connection's relay failover needs to notice its relay (the relay check runs first).
PEER_DEAD_AFTER = 4.5
#: Seconds between liveness checks.
WATCH_TICK = 0.25


@dataclass(slots=True, eq=False)
class Connection:
    """An authenticated, end-to-end encrypted QUIC connection to a peer, by its key."""

    quic: PeerConnection
    #: "direct", or "relayed" (until the punch succeeds and the connection moves).
    path: str
    strategy: str
    #: Milliseconds from connect() to an authenticated connection (client side; 0 on server).
    connect_ms: float
    #: The socket slot that punched: 0 the node's socket, else an extra socket.
    slot: int = 0
    #: Set once the path is final: direct from the start, moved to direct, or relayed for
    #: good (the punch failed).
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    #: The path the connection started on.
    first_path: str = ""
    #: The relayed path it runs over while relayed (it may change when a relay dies).
    relay: RelayPath | None = None
    #: When the connection last moved to another path (``time.monotonic()``; 0 never): the
    #: peer's silence before a move is no sign of a dead peer (``watch_peer``).
    moved_at: float = 0.0

    def __post_init__(self) -> None:
        self.first_path = self.first_path or self.path
        if self.path == "direct":
            self.settled.set()

    @property
    def peer_key(self) -> bytes:
        return self.quic.peer_key

    @property
    def rtt(self) -> float:
        return self.quic.rtt

    @property
    def remote_address(self) -> Address:
        return self.quic.addr

    async def open_stream(self) -> tuple[asyncio.StreamReader, Any]:
        return await self.quic.open_stream()

    async def accept_stream(self) -> tuple[asyncio.StreamReader, Any]:
        return await self.quic.accept_stream()

    async def close(self, *, wait: bool = True) -> None:
        """Close; ``wait=False`` returns at once (see :meth:`PeerConnection.close`)."""
        await self.quic.close(wait=wait)

    async def wait_closed(self) -> None:
        await self.quic.wait_closed()


async def watch_peer(
    conn: Connection,
    on_event: Callable[[str, dict[str, Any]], None] | None = None,
    *,
    probe_after: float = PROBE_AFTER,
    dead_after: float = PEER_DEAD_AFTER,
) -> None:
    """Notice a peer that died without a word (SIGKILL, power loss) in seconds rather than at
    QUIC's 30 s idle timeout: after ``probe_after`` without a datagram from the peer, send a
    PING every ``probe_after``; after ``dead_after`` of silence close ``conn``
    (``CLOSE_PEER_SILENT``). A relayed connection whose relay went silent is left to the relay
    failover, which closes it itself if no other relay takes over. Returns when ``conn``
    ends. Used where a dead peer must be replaced quickly (port forwarding, swarms); costs a
    PING per ``probe_after`` on an idle connection."""
    quic = conn.quic
    probed = 0.0
    while not quic.closed:
        await asyncio.sleep(WATCH_TICK)
        now = time.monotonic()
        silent = now - max(quic.last_rx, conn.moved_at)
        if conn.relay is not None and not conn.relay.alive and conn.path == "relayed":
            continue  # the relay is the one silent: its failover moves or closes the conn
        if silent >= dead_after:
            if on_event:
                on_event("peer_silent", {"public_key": conn.peer_key.hex(),
                                         "seconds": round(silent, 1)})
            await quic.close(CLOSE_PEER_SILENT, f"nothing from the peer for {silent:.1f} s",
                             wait=False)
            return
        if silent >= probe_after and now - probed >= probe_after:
            probed = now
            quic.probe()
