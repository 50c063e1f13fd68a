"""The library API: what ``docs/API.md`` documents and ``dhtnode/__init__.py`` exports.

One entry point, :func:`open_node`: an async context manager that joins the DHT through
bootstrap nodes and yields a :class:`Node`, closed (announcements withdrawn) on exit::

    async with dhtnode.open_node(["203.0.113.7:49200"]) as node:
        await node.announce(dhtnode.topic_from_name("my-app"))

Everything else a program needs hangs off :class:`Node`. The package's other modules are
internal: their names may change between versions, these do not.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from dhtnode.crypto.identity import Identity, load_or_create_identity
from dhtnode.daemon.config import Config, apply_overrides
from dhtnode.daemon.service import ClientNode, client_node, resolve
from dhtnode.dht.op import OperationError
from dhtnode.dht.records import AddressKind
from dhtnode.errors import DhtnodeError
from dhtnode.transport.connection import Connection
from dhtnode.transport.connections import Server
from dhtnode.transport.forward import Exposer, Forwarder
from dhtnode.wire.address import format_addr

#: Seconds :meth:`Node.close` waits for withdrawals to be acknowledged.
CLOSE_GRACE = 3.0


@dataclass(frozen=True)
class Found:
    """One record found by :meth:`Node.lookup`: who announced the topic and where to reach
    them. Connect with ``node.connect(found.public_key)``; the addresses are informational."""

    public_key: bytes
    #: The announcer's sequence number (milliseconds of wall time): larger is newer.
    seq: int
    #: The announcer's own public addresses, "ip:port" / "[ip6]:port".
    direct: tuple[str, ...]
    #: DHT nodes that forward introductions to the announcer.
    introducers: tuple[str, ...]


class Node:
    """A DHT node run by this program (a client: it never stores others' records). Get one
    from :func:`open_node`; every method is a coroutine except the properties."""

    def __init__(self, client: ClientNode) -> None:
        self._c = client
        self._closers: list[Exposer | Forwarder] = []
        self._closed = False

    @property
    def public_key(self) -> bytes:
        """The key this node announces and connects with (32 bytes)."""
        return self._c.identity.public_key

    @property
    def public_address(self) -> str | None:
        """Our address as other nodes see it ("ip:port"), once learned."""
        pub = self._c.node.public
        return format_addr(pub) if pub else None

    async def announce(self, topic: bytes) -> int:
        """Store our signed record for ``topic`` (32 bytes, see :func:`topic_from_name`) and
        keep refreshing it until :meth:`unannounce` or :meth:`close`. Returns how many nodes
        stored it; raises :class:`DhtnodeError` if none did."""
        return await self._c.endpoint.run(lambda n: n.announce(topic))

    async def unannounce(self, topic: bytes) -> int:
        """Withdraw our record for ``topic``; returns how many nodes acknowledged."""
        return await self._c.endpoint.run(lambda n: n.unannounce(topic))

    async def lookup(self, topic: bytes) -> list[Found]:
        """The verified records announced for ``topic``, newest first (empty: none)."""
        res = await self._c.endpoint.run(lambda n: n.lookup(topic))
        return [
            Found(
                r.public_key, r.seq,
                tuple(format_addr(a) for k, a in r.addresses if k is AddressKind.DIRECT),
                tuple(format_addr(a) for k, a in r.addresses if k is AddressKind.INTRODUCER),
            )
            for r in res.records
        ]

    async def listen(
        self,
        on_connection: Callable[[Connection], None],
        *,
        identity: Identity | None = None,
        allow: Iterable[bytes] | None = None,
    ) -> Server:
        """Serve ``identity``'s key (default: this node's): peers ``connect`` to it from
        anywhere (hole punching, or a relay). ``on_connection`` is called with each
        :class:`Connection`. ``allow``: accept only these client keys. Stop with
        ``await server.close()``."""
        allowed = None if allow is None else set(allow).__contains__
        return await self._c.connections.listen(identity or self._c.identity, on_connection,
                                                allow=allowed)

    async def connect(self, public_key: bytes) -> Connection:
        """An encrypted connection to the listener of ``public_key``; open streams on it
        with ``await conn.open_stream()`` -> ``(reader, writer)``."""
        return await self._c.connections.connect(public_key, identity=self._c.identity)

    async def expose(
        self,
        target: tuple[str, int],
        *,
        identity: Identity,
        allow: Iterable[bytes] | None = None,
    ) -> bytes:
        """Serve the local TCP service at ``target`` under ``identity``'s key to the client
        keys in ``allow`` (None: anyone who knows the key). Returns the key to give clients;
        stops on :meth:`close`."""
        allowed = None if allow is None else set(allow).__contains__
        exposer = Exposer(self._c.connections, identity, target, allow=allowed)
        await exposer.start()
        self._closers.append(exposer)
        return identity.public_key

    async def forward(self, public_key: bytes,
                      listen: tuple[str, int] = ("127.0.0.1", 0)) -> tuple[str, int]:
        """Accept TCP connections on ``listen`` and carry each to the service ``public_key``
        exposes. Returns the bound (host, port); stops on :meth:`close`."""
        fwd = Forwarder(self._c.connections, public_key, listen, identity=self._c.identity)
        bound = await fwd.start()
        self._closers.append(fwd)
        return bound

    async def close(self) -> None:
        """Stop exposing and forwarding, and withdraw every announcement."""
        if self._closed:
            return
        self._closed = True
        for c in reversed(self._closers):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(c.close(), CLOSE_GRACE)
        self._closers.clear()
        with contextlib.suppress(TimeoutError, OperationError):
            await asyncio.wait_for(self._c.endpoint.run(lambda n: n.close()), CLOSE_GRACE)


@contextlib.asynccontextmanager
async def open_node(
    bootstrap: Iterable[str],
    *,
    identity: Identity | None = None,
    host: str = "0.0.0.0",
    port: int = 0,
    config: Config | None = None,
) -> AsyncIterator[Node]:
    """Join the DHT through ``bootstrap`` ("HOST:PORT" strings) and yield a :class:`Node`.

    ``identity``: the key to announce and connect with (default: a fresh one; see
    :func:`load_identity`). ``host``/``port``: the UDP address to bind (any free port).
    ``config``: DHT tuning (``dhtnode.Config``, a frozen dataclass: build a changed copy
    with ``dataclasses.replace``). Raises :class:`DhtnodeError` (``code`` "no_network")
    when no bootstrap node answers, :class:`ConfigError` naming a bad address."""
    cfg = apply_overrides(config or Config(), host=host, bootstrap=list(bootstrap))
    seeds = await resolve(cfg.node.bootstrap)
    if not seeds:
        raise DhtnodeError("open_node: no bootstrap node could be resolved")
    async with client_node(cfg, identity=identity or Identity.generate(), bootstrap=seeds,
                           port=port) as c:
        node = Node(c)
        try:
            yield node
        finally:
            await node.close()


def load_identity(path: str | Path) -> Identity:
    """The key in the file at ``path``, created (mode 0600) if there is none; the
    directory must exist."""
    p = Path(path).expanduser()
    if not p.parent.is_dir():
        raise DhtnodeError(f"directory {p.parent} does not exist")
    return load_or_create_identity(p)[0]


__all__ = ["Found", "Node", "load_identity", "open_node"]
