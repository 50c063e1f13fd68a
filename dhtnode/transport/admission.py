"""How many incoming connections a listener holds: per client key, per client IP and in all.
A further introduction is refused as busy (``connect/listen.py``, reply reason 2) before
anything is punched; a connection in its closing period no longer counts.

Owns the counting only; ``connections.py`` asks it and tells it of each accepted connection.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any

from dhtnode.transport.connection import Connection
from dhtnode.wire.address import Address

#: Incoming connections a listener holds at once from one client key, from one IP (a carrier
#: NAT puts many users behind one), and in all. Each costs a QUIC connection's state and up to
#: its receive windows in buffers; beyond these an introduction is refused as busy before
#: anything is punched. A client needs one connection (streams multiplex); a few more cover
#: restarts whose old connection has not timed out yet.
MAX_INCOMING_PER_KEY = 16
MAX_INCOMING_PER_IP = 64
MAX_INCOMING = 1024


class IncomingLimits:
    def __init__(
        self, stats: Counter[str], spawn: Callable[[Coroutine[Any, Any, None]], None]
    ) -> None:
        self._stats = stats
        self._spawn = spawn
        #: Incoming connections by client key and by client IP, until they are gone.
        self._by_key: dict[bytes, list[Connection]] = {}
        self._by_ip: dict[str, list[Connection]] = {}

    def admit(self, client_key: bytes, client: Address) -> bool:
        """Whether a listener takes one more connection from this key and address (called
        inside the engine, before the hello is answered). A connection in its closing period
        (about 90 ms after a close) no longer counts."""

        def live(conns: list[Connection]) -> int:
            return sum(not c.quic.closed for c in conns)

        if (
            live(self._by_key.get(client_key, [])) >= MAX_INCOMING_PER_KEY
            or live(self._by_ip.get(client[0], [])) >= MAX_INCOMING_PER_IP
            or sum(live(v) for v in self._by_key.values()) >= MAX_INCOMING
        ):
            self._stats["incoming_limit"] += 1
            return False
        return True

    def count(self, conn: Connection, ip: str) -> None:
        """An incoming connection from ``ip`` was accepted: it counts until it is gone."""
        key = conn.peer_key
        self._by_key.setdefault(key, []).append(conn)
        self._by_ip.setdefault(ip, []).append(conn)

        async def forget() -> None:
            try:
                await conn.quic.wait_closed()
            finally:
                _forget(self._by_key, key, conn)
                _forget(self._by_ip, ip, conn)

        self._spawn(forget())


def _forget(table: dict[Any, list[Connection]], key: Any, conn: Connection) -> None:
    conns = table.get(key, [])
    if conn in conns:
        conns.remove(conn)
    if not conns:
        table.pop(key, None)
