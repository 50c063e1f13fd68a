"""The one UDP socket of a node and the asyncio glue that drives the sans-I/O engine.

Owns: creating the (dual-stack where possible) socket, handing every datagram to
:class:`~dhtnode.dht.node.DhtNode`, sending what it queues, keeping one loop timer armed at
its next deadline, and turning its :class:`~dhtnode.dht.op.Op` handles into awaitables.
Datagrams of first-byte ranges no engine service owns go to ``on_other``; :meth:`send`
carries other subsystems' datagrams out through the engine's send path.

Must not hold protocol logic. Time is ``time.monotonic()``, not ``loop.time()``: uvloop's loop
clock has 1 ms resolution, which the protocol timers (and later aioquic) must not inherit.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

from dhtnode.daemon.logging import get_logger
from dhtnode.dht.node import DhtNode
from dhtnode.dht.op import Op
from dhtnode.errors import DhtnodeError
from dhtnode.wire.address import Address, format_addr, normalize

T = TypeVar("T")

#: Kernel buffer sizes asked for; a busy node must not lose bursts of replies.
SOCKET_BUFFER = 1 << 20

log = get_logger("dhtnode.transport")


class BindError(DhtnodeError):
    """The UDP socket could not be opened on the configured address."""


def open_udp_socket(host: str, port: int) -> socket.socket:
    """Bind a non-blocking UDP socket. ``host`` "::" means dual-stack (IPv4 too) where the
    host supports it, else falls back to IPv4 on 0.0.0.0."""
    attempts: list[tuple[int, str]]
    if host in ("::", ""):
        attempts = [(socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")]
    elif ":" in host:
        attempts = [(socket.AF_INET6, host)]
    else:
        attempts = [(socket.AF_INET, host)]
    last: OSError | None = None
    for family, h in attempts:
        sock = None
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            if family == socket.AF_INET6 and h == "::":
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
            sock.bind((h, port))
            sock.setblocking(False)
            return sock
        except OSError as exc:
            last = exc
            if sock is not None:
                sock.close()
    where = f"UDP {host or '::'}:{port}"
    if last is not None and last.errno == errno.EADDRINUSE:
        fix = ("the port is in use: choose another --port, or check that no other dhtnode is "
               "running with the same port")
    elif last is not None and last.errno == errno.EACCES:
        fix = "permission denied: ports below 1024 need privileges; choose a --port above 1023"
    elif last is not None and last.errno == errno.EADDRNOTAVAIL:
        fix = ("that is not an address of this host: give --host one of this host's own "
               "addresses (see `ip addr`), or 0.0.0.0 / :: for all of them")
    else:
        fix = "check --host and --port"
    raise BindError(f"cannot bind {where}: {last.strerror if last else 'failed'}; {fix}")


class NodeEndpoint(asyncio.DatagramProtocol):
    """Moves datagrams and timers between one socket and one :class:`DhtNode`."""

    def __init__(
        self,
        node: DhtNode,
        *,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        on_other: Callable[[bytes, Address], None] | None = None,
    ) -> None:
        self.node = node
        self._transport: asyncio.DatagramTransport | None = None
        self._v6 = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._on_event = on_event
        self._on_other = on_other
        self.closed = asyncio.Event()

    @classmethod
    async def create(cls, node: DhtNode, host: str, port: int, **kwargs: Any) -> NodeEndpoint:
        return await cls.create_on(open_udp_socket(host, port), node, **kwargs)

    @classmethod
    async def create_on(cls, sock: socket.socket, node: DhtNode, **kwargs: Any) -> NodeEndpoint:
        """Drive ``node`` on an already bound socket (so its port is known beforehand)."""
        loop = asyncio.get_running_loop()
        ep = cls(node, **kwargs)
        await loop.create_datagram_endpoint(lambda: ep, sock=sock)
        return ep

    @property
    def is_v6(self) -> bool:
        """The socket is IPv6 (dual-stack when bound to ::)."""
        return self._v6

    def send(self, data: bytes, addr: Address) -> None:
        """Send a datagram that is not the engine's own (QUIC, punch probes) through the
        engine's one send path, so its sent-to memory sees it, and flush at once."""
        self.node.ctx.send(data, addr)
        self._service()

    @property
    def local_address(self) -> Address:
        assert self._transport is not None
        return normalize(self._transport.get_extra_info("sockname"))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's and uvloop's UDP transports do not all subclass DatagramTransport.
        self._transport = cast(asyncio.DatagramTransport, transport)
        sock = transport.get_extra_info("socket")
        self._v6 = sock is not None and sock.family == socket.AF_INET6
        self._service()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.closed.set()

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        try:
            source = normalize(addr)
        except ValueError:
            self.node.stats["drop_bad_source"] += 1
            return
        try:
            if not self.node.receive(data, source, time.monotonic()):
                if self._on_other is not None:
                    self._on_other(data, source)
                else:
                    self.node.stats["drop_no_handler"] += 1  # QUIC/punch/relay not wired yet
        except Exception:
            # The engine counts every bad input it knows of; reaching here is a bug of ours.
            # Keep serving everyone else and leave a trace, rather than let one datagram stop
            # the node.
            self.node.stats["receive_error"] += 1
            log.exception("receive_failed", source=format_addr(source), size=len(data))
        self._service()

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (port unreachable) surface here on Linux; timeouts handle the peer.
        self.node.stats["socket_error"] += 1

    def sendto(self, data: bytes, addr: Address) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        dest: tuple[Any, ...] = addr
        if self._v6 and ":" not in addr[0]:
            dest = ("::ffff:" + addr[0], addr[1])
        elif not self._v6 and ":" in addr[0]:
            self.node.stats["drop_family_mismatch"] += 1
            return
        try:
            self._transport.sendto(data, dest)
        except OSError:
            self.node.stats["socket_error"] += 1

    def _service(self) -> None:
        """Flush what the engine queued, log its events and keep the timer armed."""
        node = self.node
        if node.ctx.out:  # runs once per datagram each way: skip the empty swap
            for data, addr in node.datagrams_to_send():
                self.sendto(data, addr)
        if node.events:
            events, node.events = node.events, []
            for name, fields in events:
                if self._on_event is not None:
                    self._on_event(name, fields)
        deadline = node.next_timer()
        if deadline is None:
            return
        # Re-arm only for an earlier deadline; a later one is picked up when this one fires.
        if self._timer_at is not None and self._timer_at <= deadline:
            return
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer_at = deadline
        self._timer = loop.call_later(max(0.0, deadline - time.monotonic()), self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = None
        self.node.handle_timer(time.monotonic())
        self._service()

    async def run(self, start: Callable[[DhtNode], Op[T]]) -> T:
        """Start an operation on the engine and wait for its result."""
        self.node.handle_timer(time.monotonic())  # operations read the engine's notion of now
        op = start(self.node)
        self._service()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()

        def done(o: Op[T]) -> None:
            if fut.done():
                return
            if o.error is not None:
                fut.set_exception(o.error)
            else:
                fut.set_result(o.result())

        op.add_done_callback(done)
        return await fut

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._transport is not None:
            self._transport.close()
