"""Topic swarms, as Hyperswarm has them: everyone who joins a topic connects to everyone else.

``swarm = await Swarm.join(conns, topic, identity, on_connection)`` listens on ``identity``'s
key, announces a record under ``topic`` signed by that key (so peers learn the key from the
topic), and looks the topic up again and again, connecting to every key it finds. Exactly one
connection per pair, even when both sides find each other at once: only the side with the
smaller public key dials, the other waits to be dialled (both compute the same). Peers that
leave drop out when their connection closes; new ones are found at the next lookup.

A peer that dies without a word (SIGKILL, power loss) is noticed in seconds: every swarm
connection is watched (``connection.watch_peer``: PINGs while silent, closed after
:data:`DEAD_AFTER`), such a lost peer makes the next lookup come at once (one that closed its
connection on purpose is leaving and is not looked for), and a peer that cannot be
dialled yet (it is still restarting) is tried again after :data:`RETRY_MIN`, doubling up to
:data:`RETRY_AFTER`. Without this, the smaller key of a pair kept a dead connection until
QUIC's 30 s idle timeout and then waited for its backed-off lookup, so a restarted peer with
the larger key was dialled again only about 40 s later.

Must not decide how to connect; it only decides whom, and when to look again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from dhtnode.crypto.identity import Identity
from dhtnode.errors import DhtnodeError
from dhtnode.transport.connection import Connection, watch_peer
from dhtnode.transport.connections import Connections, Server
from dhtnode.transport.quic import CLOSE_PEER_SILENT

#: Seconds between lookups of the topic right after joining; doubles up to the maximum, and
#: falls back to the minimum when a new peer shows up.
MIN_REFRESH = 2.0
MAX_REFRESH = 60.0
#: Dials in flight at once per swarm (a busy topic must not open hundreds of punches).
MAX_DIALS = 8
#: Seconds before a key that could not be dialled is tried again, at most...
RETRY_AFTER = 30.0
#: ...and at first: a peer found again right after its connection died is often restarting,
#: and listens again within seconds. Doubles with each failure in a row.
RETRY_MIN = 2.0
#: Seconds of silence from a peer after which a swarm connection PINGs it (then once per
#: such interval while silent): longer than forwarding's, as a swarm holds many connections.
PROBE_AFTER = 2.0
#: Seconds of silence (PINGs notwithstanding) after which a swarm connection counts as dead.
DEAD_AFTER = 6.0


class Swarm:
    def __init__(
        self,
        conns: Connections,
        topic: bytes,
        identity: Identity,
        on_connection: Callable[[Connection], None],
    ) -> None:
        self._conns = conns
        self.topic = topic
        self._identity = identity
        self._on_connection = on_connection
        #: Live connections, by peer key.
        self.peers: dict[bytes, Connection] = {}
        self._failed: dict[bytes, float] = {}
        #: Failed dials in a row, by key (the retry backoff).
        self._fails: dict[bytes, int] = {}
        #: Set to make the refresh loop look the topic up now (a peer was lost, or a retry
        #: is due).
        self._wake = asyncio.Event()
        self._dialing: set[bytes] = set()
        self._server: Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._sem = asyncio.Semaphore(MAX_DIALS)

    @classmethod
    async def join(
        cls,
        conns: Connections,
        topic: bytes,
        identity: Identity,
        on_connection: Callable[[Connection], None],
    ) -> Swarm:
        swarm = cls(conns, topic, identity, on_connection)
        swarm._server = await conns.listen(identity, swarm._accepted)
        await conns.endpoint.run(lambda n: n.topics.announce(topic, identity=identity))
        swarm._task = asyncio.get_running_loop().create_task(swarm._refresh_loop())
        return swarm

    @property
    def public_key(self) -> bytes:
        return self._identity.public_key

    def status(self) -> dict[str, Any]:
        return {"topic": self.topic.hex(), "peers": sorted(k.hex() for k in self.peers)}

    def _add(self, conn: Connection) -> None:
        key = conn.peer_key
        old = self.peers.get(key)
        if old is not None and not old.quic.closed:
            if old.quic.is_client or conn.quic.is_client:
                # A second connection to the same peer in the other direction (a race the
                # tie-break should prevent): keep the first, so both sides keep the same one.
                self._spawn(conn.close())
                return
            # The peer dialled us again: it dials only when it has no connection to us, so
            # ours is stale (it restarted, or lost the connection without a word reaching
            # us). Keeping it would refuse the peer until the stale one idles out.
            self._spawn(old.close())
        self.peers[key] = conn
        self._spawn(self._watch(conn))
        self._spawn(watch_peer(conn, probe_after=PROBE_AFTER, dead_after=DEAD_AFTER))
        self._on_connection(conn)

    def _accepted(self, conn: Connection) -> None:
        self._add(conn)

    async def _watch(self, conn: Connection) -> None:
        with contextlib.suppress(Exception):
            await conn.wait_closed()
        if self.peers.get(conn.peer_key) is conn:
            del self.peers[conn.peer_key]
            if conn.quic.close_code == CLOSE_PEER_SILENT:
                # It died without a word, and may be back already (restarted): look again
                # now. (A peer that closed on purpose is leaving: its record goes too.)
                self._wake.set()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refresh_loop(self) -> None:
        delay = MIN_REFRESH
        while True:
            self._wake.clear()
            found_new = await self.refresh()
            delay = MIN_REFRESH if found_new else min(delay * 2, MAX_REFRESH)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            if self._wake.is_set():
                delay = MIN_REFRESH

    async def refresh(self) -> bool:
        """Look the topic up once and dial every new key we should dial; True if any."""
        try:
            res = await self._conns.endpoint.run(lambda n: n.lookup(self.topic))
        except DhtnodeError:
            return False
        loop = asyncio.get_running_loop()
        new = False
        for rec in res.records:
            key = rec.public_key
            if key == self.public_key or key in self.peers or key in self._dialing:
                continue
            if loop.time() < self._failed.get(key, 0.0):
                continue
            new = True
            if self.public_key < key:  # the tie-break: the smaller key dials
                self._dialing.add(key)
                self._spawn(self._dial(key))
        return new

    async def _dial(self, key: bytes) -> None:
        try:
            async with self._sem:
                if key in self.peers:
                    return
                conn = await self._conns.connect(key, identity=self._identity)
            self._fails.pop(key, None)
            self._add(conn)
        except DhtnodeError:
            n = self._fails[key] = self._fails.get(key, 0) + 1
            retry = min(RETRY_AFTER, RETRY_MIN * 2 ** (n - 1))
            loop = asyncio.get_running_loop()
            self._failed[key] = loop.time() + retry
            loop.call_later(retry, self._wake.set)
        finally:
            self._dialing.discard(key)

    async def leave(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for conn in list(self.peers.values()):
            with contextlib.suppress(Exception):
                await conn.close()
        self.peers.clear()
        with contextlib.suppress(DhtnodeError):
            await asyncio.wait_for(
                self._conns.endpoint.run(
                    lambda n: n.topics.unannounce(self.topic, identity=self._identity)
                ),
                3.0,
            )
        if self._server is not None:
            await self._server.close()
