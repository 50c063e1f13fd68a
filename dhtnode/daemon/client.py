"""Short-lived client nodes for one-shot commands (``lookup``, ``ping PUBKEY``, ``listen``,
``connect``, ``expose``/``forward``, ``join``) and the key ping.

A client node never serves: it joins through the bootstrap list (or the daemon's node cache),
does its work and closes. Must not hold protocol logic.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

from dhtnode.connect.services import plug_in
from dhtnode.crypto.identity import Identity
from dhtnode.daemon.config import Config
from dhtnode.daemon.state import load_node_cache
from dhtnode.daemon.wiring import log, log_event, params_from_config, resolve
from dhtnode.dht.node import DhtNode
from dhtnode.dht.op import NoAnswer
from dhtnode.errors import DhtnodeError
from dhtnode.nat.punch import PUNCH_DEADLINE
from dhtnode.transport.udp import NodeEndpoint, open_udp_socket
from dhtnode.wire import address as wire_address
from dhtnode.wire.address import Address

if TYPE_CHECKING:
    from dhtnode.transport.connection import Connection
    from dhtnode.transport.connections import Connections, Server

#: The QUIC side of a client node (aioquic, cryptography, the connection manager): about a
#: third of a fresh ``dhtnode ping``'s start-up. :func:`client_node` imports it in a worker
#: thread while the bootstrap round trips run and waits for it only after them; on a real
#: network (RTTs of tens of ms) the import is then mostly hidden. Imports in a thread do not
#: overlap with other Python work (the GIL; measured: no gain), only with the loop's waits.
CONNECTIONS_MODULE = "dhtnode.transport.connections"


@dataclass
class ClientNode:
    endpoint: NodeEndpoint
    identity: Identity
    connections: Connections

    async def listen(
        self,
        identity: Identity,
        on_connection: Callable[[Connection], None],
        *,
        allow: Callable[[bytes], bool] | None = None,
    ) -> Server:
        """Serve ``identity``'s public key (see :meth:`Connections.listen`)."""
        return await self.connections.listen(identity, on_connection, allow=allow)

    async def connect(self, public_key: bytes, *, identity: Identity | None = None) -> Connection:
        """Connect to the listener of ``public_key`` (see :meth:`Connections.connect`)."""
        return await self.connections.connect(public_key, identity=identity or self.identity)

    @property
    def node(self) -> DhtNode:
        return self.endpoint.node


@contextlib.asynccontextmanager
async def client_node(
    cfg: Config,
    *,
    identity: Identity | None = None,
    bootstrap: list[Address] | None = None,
    port: int = 0,
) -> AsyncIterator[ClientNode]:
    """A short-lived node for one-shot commands: never serves, joins through ``bootstrap``
    (or the configured list, or the daemon's node cache), and is closed on exit."""
    if bootstrap is None:
        bootstrap = await resolve(cfg.node.bootstrap)
    if not bootstrap:
        with contextlib.suppress(DhtnodeError):
            bootstrap = load_node_cache(cfg.node.state_dir)
    if not bootstrap:
        raise DhtnodeError(
            "no bootstrap node: pass --bootstrap HOST:PORT (repeatable), set node.bootstrap in "
            "the config, or run a daemon first so its node cache can be used"
        )
    loop = asyncio.get_running_loop()
    connections_module: asyncio.Future[ModuleType] = loop.run_in_executor(
        None, importlib.import_module, CONNECTIONS_MODULE)
    ident = identity or Identity.generate()
    node = DhtNode(
        ident,
        params_from_config(cfg),
        now=time.monotonic(),
        wall=time.time,
        rng=random.Random(),
        seeds=bootstrap,
        ephemeral=True,
    )
    host = "0.0.0.0" if cfg.node.host in ("", "0.0.0.0") else cfg.node.host
    services = plug_in(node)
    ep = await NodeEndpoint.create_on(open_udp_socket(host, port), node, on_event=log_event)
    conns: Connections | None = None
    try:
        joined = await ep.run(lambda n: n.bootstrap())
        # A one-shot client is in nobody's table, so no punch or QUIC datagram is addressed
        # to it before it connects or listens: the connection manager can plug in this late.
        conns = (await connections_module).Connections(ep, services, on_event=log_event)
        if joined == 0:
            shown = ", ".join(wire_address.format_addr(a) for a in bootstrap[:4])
            more = f" and {len(bootstrap) - 4} more" if len(bootstrap) > 4 else ""
            log.warning("bootstrap_unanswered", seeds=[wire_address.format_addr(a)
                                                       for a in bootstrap[:8]])
            raise NoAnswer(
                f"nothing answered: no bootstrap node replied ({shown}{more}). Check the "
                "HOST:PORT, that a node runs there, and that UDP to it is not blocked"
            )
        yield ClientNode(ep, ident, conns)
    finally:
        if conns is not None:
            await conns.close()
        ep.close()
        with contextlib.suppress(Exception):  # import errors surface above when awaited
            await connections_module


#: Messages echoed by a key ping, and their size.
PING_MESSAGES = 3
PING_SIZE = 32


async def ping_key(conns: Connections, key_hex: str) -> dict[str, Any]:
    """Connect to the listener of a key, echo a few messages over one stream, close."""
    try:
        key = bytes.fromhex(key_hex)
        if len(key) != 32:
            raise ValueError
    except ValueError:
        raise DhtnodeError(f"public key: expected 64 hex characters, got {key_hex!r}") from None
    conn = await conns.connect(key)
    try:
        reader, writer = await conn.open_stream()
        rtts = []
        for i in range(PING_MESSAGES):
            msg = bytes([i]) * PING_SIZE
            t0 = time.monotonic()
            writer.write(msg)
            await writer.drain()
            got = await asyncio.wait_for(reader.readexactly(PING_SIZE), 5.0)
            rtts.append((time.monotonic() - t0) * 1000)
            if got != msg:
                raise DhtnodeError("the peer answered with other bytes than sent: not an echo")
        writer.write_eof()
        # A connection that started on the relay moves to the direct path once the punch
        # succeeds: report where it ends up (and where it started).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(conn.settled.wait(), PUNCH_DEADLINE)
    except (asyncio.IncompleteReadError, TimeoutError) as exc:
        raise DhtnodeError(
            "connected, but the peer does not echo (is it `dhtnode listen --echo`?)"
        ) from exc
    finally:
        await conn.close(wait=False)
    return {
        "public_key": key.hex(),
        "path": conn.path,
        "first_path": conn.first_path,
        "strategy": conn.strategy,
        "connect_ms": round(conn.connect_ms, 2),
        "rtt_ms": round(min(rtts), 3),
        "address": wire_address.format_addr(conn.remote_address),
    }
