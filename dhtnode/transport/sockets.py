"""A bounded pool of extra UDP sockets for hole punching.

Punching through a NAT that picks a new public port per destination needs many local sockets
at once (up to 256 per attempt), while a home machine often allows only 1,024 open files. This
module owns those extra sockets: opening them (ephemeral ports, dual-stack like the node's own
socket), moving their datagrams to the caller, and keeping the number open at or below one
limit for all attempts together. An attempt that finds too few free waits its turn in a FIFO
queue instead of failing; when its timeout passes it takes what is free if that is enough.

Accounting: a socket counts against the limit from the moment it is granted until its
transport reports ``connection_lost`` (the file descriptor is closed by then on both asyncio
and uvloop), so even sockets that are closing but not yet closed are never over the limit. A
socket detached with :meth:`Lease.keep` still counts until it is closed.

Must not: know about punching, packets or peers (callers decide what to send where), touch
the node's own socket (``udp.py``), or create tasks (everything is callbacks and futures).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import functools
import socket
from collections.abc import Callable
from types import TracebackType
from typing import Any, cast

from dhtnode.daemon.logging import get_logger
from dhtnode.errors import DhtnodeError
from dhtnode.wire.address import Address, format_addr, normalize

#: Extra sockets open at once across all attempts, by default: two full 256-socket attempts.
DEFAULT_LIMIT = 512
#: The pool takes at most this share of the open-file soft limit (RLIMIT_NOFILE); the rest is
#: for the node's own socket, QUIC connections, the state directory, logs and the control
#: socket. With the common soft limit of 1,024 that is 512.
RLIMIT_SHARE = 0.5
#: Seconds :meth:`SocketPool.acquire` waits for a full set by default. A punch attempt lasts a
#: few seconds; waiting longer than this, it is better off punching with fewer sockets.
DEFAULT_ACQUIRE_TIMEOUT = 2.0
#: errno values that mean "out of descriptors or kernel memory": opening more will not help,
#: and they must not be mistaken for "no IPv6 here".
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

DatagramCallback = Callable[[int, bytes, Address], None]
"""``on_datagram(slot, data, source)`` of a lease."""
KeptCallback = Callable[[bytes, Address], None]
"""``on_datagram(data, source)`` of a kept socket."""

log = get_logger("dhtnode.transport.sockets")


class SocketPoolError(DhtnodeError):
    """Too few sockets could be had (limit reached until the timeout, or the OS refused)."""


def effective_limit(limit: int) -> int:
    """``limit`` capped to :data:`RLIMIT_SHARE` of the open-file soft limit (at least 1)."""
    if limit < 1:
        raise ValueError(f"socket pool limit must be at least 1, got {limit}")
    try:
        import resource
    except ImportError:  # not a Unix: no rlimit to respect
        return limit
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return limit
    return max(1, min(limit, int(soft * RLIMIT_SHARE)))


class _SlotProtocol(asyncio.DatagramProtocol):
    """One pooled socket: forwards datagrams to whoever owns the socket now."""

    def __init__(self, pool: SocketPool, on_datagram: KeptCallback | None, dual: bool) -> None:
        self.pool = pool
        self.on_datagram = on_datagram
        #: A dual-stack IPv6 socket: IPv4 destinations are sent as IPv4-mapped.
        self.dual = dual
        self.v6 = False
        self.transport: asyncio.DatagramTransport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._gone = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's and uvloop's UDP transports do not all subclass DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)
        sock = transport.get_extra_info("socket")
        self.v6 = sock is not None and sock.family == socket.AF_INET6

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone()

    def gone(self) -> None:
        """The descriptor is closed: give its place back (once)."""
        if self._gone:
            return
        self._gone = True
        self.on_datagram = None
        if not self.closed.done():
            self.closed.set_result(None)
        self.pool._socket_gone(self)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        callback = self.on_datagram
        if callback is None:
            return
        try:
            source = normalize(addr)
        except ValueError:
            self.pool.stats["drop_bad_source"] += 1
            return
        try:
            callback(data, source)
        except Exception:
            # A bug in the caller's handler must not stop the other sockets' datagrams.
            self.pool.stats["callback_error"] += 1
            log.exception("datagram_callback_failed", source=format_addr(source))

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and the like are routine while punching; the attempt's own
        # timeouts deal with the peer.
        self.pool.stats["socket_error"] += 1

    def send(self, data: bytes, addr: Address) -> bool:
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        dest: tuple[Any, ...] = addr
        if ":" not in addr[0]:
            if self.v6:
                if not self.dual:
                    self.pool.stats["drop_family_mismatch"] += 1
                    return False
                dest = ("::ffff:" + addr[0], addr[1])
        elif not self.v6:
            self.pool.stats["drop_family_mismatch"] += 1
            return False
        transport.sendto(data, dest)  # OSErrors go to error_received
        return True

    def local_address(self) -> Address:
        assert self.transport is not None
        return normalize(self.transport.get_extra_info("sockname"))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class KeptSocket:
    """A socket taken out of a lease (the path that worked). It stays open, and counted by the
    pool, until :meth:`close`. Set :attr:`on_datagram` to take over its datagrams; until then
    they still go to the lease's callback with the old slot number."""

    def __init__(self, proto: _SlotProtocol, slot: int) -> None:
        self._proto = proto
        self.slot = slot

    @property
    def on_datagram(self) -> KeptCallback | None:
        return self._proto.on_datagram

    @on_datagram.setter
    def on_datagram(self, callback: KeptCallback | None) -> None:
        if not self.closed:
            self._proto.on_datagram = callback

    @property
    def closed(self) -> bool:
        t = self._proto.transport
        return t is None or t.is_closing()

    @property
    def local_address(self) -> Address:
        return self._proto.local_address()

    def send(self, data: bytes, addr: Address) -> bool:
        """Queue ``data`` to ``addr``; False if closed or of the other address family."""
        return self._proto.send(data, addr)

    def close(self) -> None:
        self._proto.close()

    async def wait_closed(self) -> None:
        await self._proto.closed


class Lease:
    """Sockets granted to one attempt, numbered 1..n. Close it (or use ``async with``)."""

    def __init__(self, pool: SocketPool, on_datagram: DatagramCallback) -> None:
        self._pool = pool
        self._on_datagram = on_datagram
        self._slots: dict[int, _SlotProtocol] = {}
        self._closing: list[_SlotProtocol] = []
        self.closed = False

    def _callback_for(self, slot: int) -> KeptCallback:
        return functools.partial(self._on_datagram, slot)

    @property
    def slots(self) -> tuple[int, ...]:
        """Slots still held (kept and closed ones are gone)."""
        return tuple(self._slots)

    def __len__(self) -> int:
        return len(self._slots)

    def _proto(self, slot: int) -> _SlotProtocol:
        proto = self._slots.get(slot)
        if proto is None:
            raise ValueError(f"slot {slot} is not held by this lease (closed, kept or unknown)")
        return proto

    def send(self, slot: int, data: bytes, addr: Address) -> bool:
        """Queue ``data`` to ``addr`` from ``slot``. False (nothing sent) if the slot is gone
        or ``addr`` is of the other address family; a punch loop may race with close."""
        proto = self._slots.get(slot)
        return proto is not None and proto.send(data, addr)

    def local_address(self, slot: int) -> Address:
        return self._proto(slot).local_address()

    def keep(self, slot: int) -> KeptSocket:
        """Detach ``slot`` from the lease and keep it open after :meth:`close`."""
        proto = self._proto(slot)
        del self._slots[slot]
        kept = KeptSocket(proto, slot)
        self._pool._kept.add(proto)
        return kept

    def close(self) -> None:
        """Close every socket still held. Idempotent; the places are free once they are
        closed (:meth:`wait_closed`)."""
        if self.closed:
            return
        self.closed = True
        self._pool._leases.discard(self)
        for proto in self._slots.values():
            proto.close()
            self._closing.append(proto)
        self._slots.clear()

    async def wait_closed(self) -> None:
        """Wait until every socket this lease closed has given its place back."""
        for proto in self._closing:
            await proto.closed

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
        await self.wait_closed()


class _Waiter:
    __slots__ = ("future", "min_n", "n", "timer")

    def __init__(self, n: int, min_n: int, future: asyncio.Future[int]) -> None:
        self.n = n
        self.min_n = min_n
        self.future = future
        self.timer: asyncio.TimerHandle | None = None


class SocketPool:
    """At most :attr:`limit` extra UDP sockets open at once, shared FIFO-fairly by attempts."""

    def __init__(self, limit: int = DEFAULT_LIMIT, *, bind_host: str = "0.0.0.0") -> None:
        #: The limit in force: the one asked for, capped by :func:`effective_limit`.
        self.limit = effective_limit(limit)
        self.bind_host = bind_host
        #: Sockets granted and not yet closed (open, being opened, or kept).
        self._granted = 0
        self._open = 0
        #: Most sockets open at once so far.
        self.peak = 0
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._leases: set[Lease] = set()
        self._kept: set[_SlotProtocol] = set()
        self._live: set[_SlotProtocol] = set()
        #: None until the first "::" socket says whether this host has IPv6.
        self._dual_ok: bool | None = None
        self.closed = False
        self.stats: collections.Counter[str] = collections.Counter()

    @property
    def open_sockets(self) -> int:
        """Sockets whose descriptor is open now (including kept ones)."""
        return self._open

    @property
    def waiting(self) -> int:
        """Acquires queued for sockets."""
        return len(self._waiters)

    @property
    def free(self) -> int:
        return self.limit - self._granted

    async def acquire(
        self,
        n: int,
        on_datagram: DatagramCallback,
        *,
        min_n: int = 1,
        timeout: float | None = DEFAULT_ACQUIRE_TIMEOUT,
    ) -> Lease:
        """Open ``n`` sockets (slots 1..n) delivering to ``on_datagram(slot, data, source)``.

        Waits in FIFO order while fewer than ``n`` are free. When ``timeout`` seconds pass
        (``None``: never), takes what is free if that is at least ``min_n``, else raises
        :class:`SocketPoolError`. ``n`` above :attr:`limit` is reduced to it.
        """
        if self.closed:
            raise SocketPoolError("the socket pool is closed")
        if not 1 <= min_n <= n:
            raise ValueError(f"need 1 <= min_n <= n, got min_n={min_n}, n={n}")
        if min_n > self.limit:
            raise SocketPoolError(
                f"{min_n} sockets needed but the pool allows {self.limit} (a share of the "
                "open-file limit); raise it with `ulimit -n`"
            )
        n = min(n, self.limit)
        granted = await self._reserve(n, min_n, timeout)
        return await self._open_lease(granted, min_n, on_datagram)

    async def _reserve(self, n: int, min_n: int, timeout: float | None) -> int:
        if not self._waiters and self.free >= n:
            self._granted += n
            return n
        loop = asyncio.get_running_loop()
        waiter = _Waiter(n, min_n, loop.create_future())
        self._waiters.append(waiter)
        if timeout is not None:
            waiter.timer = loop.call_later(max(0.0, timeout), self._timed_out, waiter)
        try:
            return await waiter.future
        except asyncio.CancelledError:
            fut = waiter.future
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._ungrant(fut.result())  # granted just as we were cancelled
            else:
                self._drop_waiter(waiter)
            raise

    def _drop_waiter(self, waiter: _Waiter) -> None:
        if waiter.timer is not None:
            waiter.timer.cancel()
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)
            # It may have been the head holding back smaller requests behind it.
            self._pump()

    def _timed_out(self, waiter: _Waiter) -> None:
        if waiter.future.done():
            return
        waiter.timer = None
        self._drop_waiter(waiter)
        free = self.free
        if free >= waiter.min_n:
            take = min(waiter.n, free)
            self._granted += take
            waiter.future.set_result(take)
        else:
            waiter.future.set_exception(
                SocketPoolError(
                    f"only {free} of the {waiter.n} sockets asked for were free after the "
                    f"timeout ({self.limit - free} of {self.limit} in use by other attempts)"
                )
            )

    def _pump(self) -> None:
        """Grant queued requests in order while the head one fits."""
        while self._waiters:
            head = self._waiters[0]
            if head.future.done():  # cancelled while queued
                self._waiters.popleft()
                continue
            if self.free < head.n:
                return  # strict FIFO: a small request does not overtake a large one
            self._waiters.popleft()
            if head.timer is not None:
                head.timer.cancel()
            self._granted += head.n
            head.future.set_result(head.n)

    def _ungrant(self, count: int) -> None:
        self._granted -= count
        self._pump()

    def _new_socket(self) -> tuple[socket.socket, bool]:
        """A bound non-blocking UDP socket on an ephemeral port, and whether it is dual-stack.
        Raises OSError."""
        host = self.bind_host
        if host in ("::", "") and self._dual_ok is not False:
            sock = None
            try:
                sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                sock.bind(("::", 0))
                sock.setblocking(False)
                self._dual_ok = True
                return sock, True
            except OSError as exc:
                if sock is not None:
                    sock.close()
                if exc.errno in _RESOURCE_ERRNOS or self._dual_ok:
                    raise
                self._dual_ok = False  # no IPv6 on this host: IPv4 only from now on
        if host in ("::", ""):
            host = "0.0.0.0"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.bind((host, 0))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock, False

    async def _open_lease(self, granted: int, min_n: int, on_datagram: DatagramCallback) -> Lease:
        loop = asyncio.get_running_loop()
        lease = Lease(self, on_datagram)
        self._leases.add(lease)
        error: OSError | None = None
        #: Grants that became sockets: each gives its grant back itself when it closes.
        created = 0
        try:
            for slot in range(1, granted + 1):
                if self.closed:
                    break
                try:
                    sock, dual = self._new_socket()
                except OSError as exc:
                    error = exc
                    break
                created += 1
                self._open += 1
                self.peak = max(self.peak, self._open)
                proto = _SlotProtocol(self, lease._callback_for(slot), dual)
                self._live.add(proto)
                made = False

                def factory(proto: _SlotProtocol = proto) -> _SlotProtocol:
                    nonlocal made
                    made = True
                    return proto

                try:
                    await loop.create_datagram_endpoint(factory, sock=sock)
                except BaseException as exc:
                    if not made:  # the loop never took the socket: it is ours to close
                        sock.close()
                        proto.gone()
                    # Otherwise the transport owns the socket and reports connection_lost.
                    if isinstance(exc, OSError):
                        error = exc
                        break
                    raise
                lease._slots[slot] = proto
        except BaseException:
            # Cancelled (or worse) half-way: give back what was opened and what was not.
            self._ungrant(granted - created)
            lease.close()
            raise
        self._ungrant(granted - created)
        if self.closed:
            lease.close()
            raise SocketPoolError("the socket pool was closed while opening sockets")
        if len(lease) < min_n:
            lease.close()
            raise SocketPoolError(
                f"could open only {len(lease)} of {granted} UDP sockets: {error}. The open-file "
                "limit may be too low (`ulimit -n`), or bind_host is not a local address"
            )
        return lease

    def _socket_gone(self, proto: _SlotProtocol) -> None:
        if proto in self._live:
            self._live.discard(proto)
            self._kept.discard(proto)
            self._open -= 1
            self._granted -= 1
            self._pump()

    def close(self) -> None:
        """Close every socket (leases and kept ones) and fail every queued acquire."""
        if self.closed:
            return
        self.closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if waiter.timer is not None:
                waiter.timer.cancel()
            if not waiter.future.done():
                waiter.future.set_exception(SocketPoolError("the socket pool was closed"))
        for lease in list(self._leases):
            lease.close()
        for proto in list(self._kept):
            proto.close()

    async def wait_closed(self) -> None:
        """Wait until every socket of the pool is closed (after :meth:`close`, all of them)."""
        while self._live:
            await asyncio.gather(*(p.closed for p in list(self._live)))
