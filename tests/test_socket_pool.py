"""The bounded pool of extra UDP sockets used for hole punching (loopback traffic only)."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable

import pytest
import uvloop

from dhtnode.transport import sockets as sockets_module
from dhtnode.transport.sockets import SocketPool, SocketPoolError, effective_limit
from dhtnode.wire.address import Address, normalize
from tests.loopnet import has_ipv6_loopback


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def ignore(slot: int, data: bytes, source: Address) -> None:
    pass



async def until(cond: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def plain_socket(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.settimeout(2.0)
    return sock


async def test_acquire_and_close_return_descriptors() -> None:
    pool = SocketPool(64, bind_host="127.0.0.1")
    before = fd_count()
    lease = await pool.acquire(50, ignore)
    assert lease.slots == tuple(range(1, 51)) and len(lease) == 50
    assert fd_count() == before + 50
    assert pool.open_sockets == 50 and pool.peak == 50 and pool.waiting == 0
    ports = {lease.local_address(s)[1] for s in lease.slots}
    assert len(ports) == 50 and all(lease.local_address(1)[0] == "127.0.0.1" for _ in ports)
    lease.close()
    lease.close()  # idempotent
    await lease.wait_closed()
    assert fd_count() == before and pool.open_sockets == 0 and pool.peak == 50
    assert lease.slots == () and not lease.send(1, b"x", ("127.0.0.1", 9))


async def test_second_acquire_waits_for_the_first() -> None:
    pool = SocketPool(10, bind_host="127.0.0.1")
    first = await pool.acquire(10, ignore)
    second = asyncio.create_task(pool.acquire(6, ignore, timeout=None))
    await asyncio.sleep(0.05)
    assert not second.done() and pool.waiting == 1 and pool.open_sockets == 10
    first.close()
    lease = await asyncio.wait_for(second, 2.0)
    assert len(lease) == 6 and pool.waiting == 0 and pool.peak == 10
    lease.close()
    await lease.wait_closed()
    assert pool.open_sockets == 0


async def test_queue_is_fifo() -> None:
    pool = SocketPool(10, bind_host="127.0.0.1")
    big_holder = await pool.acquire(8, ignore)
    small_holder = await pool.acquire(2, ignore)
    big = asyncio.create_task(pool.acquire(8, ignore, timeout=None))
    await asyncio.sleep(0)
    small = asyncio.create_task(pool.acquire(2, ignore, timeout=None))
    await asyncio.sleep(0.02)
    assert pool.waiting == 2
    small_holder.close()
    await small_holder.wait_closed()
    await asyncio.sleep(0.02)
    # Two are free, but the request queued first needs eight: nobody overtakes it.
    assert not big.done() and not small.done()
    big_holder.close()
    got_big, got_small = await asyncio.wait_for(asyncio.gather(big, small), 2.0)
    assert len(got_big) == 8 and len(got_small) == 2
    pool.close()
    await pool.wait_closed()


async def test_timeout_takes_min_n_or_fails() -> None:
    pool = SocketPool(10, bind_host="127.0.0.1")
    holder = await pool.acquire(7, ignore)
    start = time.monotonic()
    partial = await pool.acquire(8, ignore, min_n=2, timeout=0.1)
    assert 0.09 <= time.monotonic() - start < 1.0
    assert len(partial) == 3 and partial.slots == (1, 2, 3)
    with pytest.raises(SocketPoolError, match="only 0 of the 4"):
        await pool.acquire(4, ignore, min_n=1, timeout=0.05)
    assert pool.waiting == 0 and pool.open_sockets == 10
    # A request larger than the whole pool is cut to the limit instead of waiting forever.
    holder.close()
    partial.close()
    lease = await pool.acquire(1000, ignore, timeout=1.0)
    assert len(lease) == 10
    with pytest.raises(SocketPoolError, match="ulimit"):
        await pool.acquire(20, ignore, min_n=11)
    pool.close()
    await pool.wait_closed()


async def test_cancelled_waiter_leaves_the_queue() -> None:
    pool = SocketPool(4, bind_host="127.0.0.1")
    holder = await pool.acquire(4, ignore)
    task = asyncio.create_task(pool.acquire(4, ignore, timeout=None))
    later = asyncio.create_task(pool.acquire(1, ignore, timeout=None))
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pool.waiting == 1
    holder.close()
    lease = await asyncio.wait_for(later, 2.0)
    assert len(lease) == 1
    lease.close()
    await lease.wait_closed()
    assert pool.open_sockets == 0 and pool.free == 4


async def test_concurrent_attempts_never_exceed_the_limit() -> None:
    pool = SocketPool(16, bind_host="127.0.0.1")
    before = fd_count()
    seen_open: list[int] = []

    async def attempt(i: int) -> None:
        lease = await pool.acquire(6 + i % 5, ignore, timeout=None)
        seen_open.append(fd_count() - before)
        await asyncio.sleep(0.001 * (i % 3))
        lease.close()

    await asyncio.wait_for(asyncio.gather(*(attempt(i) for i in range(30))), 10.0)
    await pool.wait_closed()
    assert pool.peak <= 16 and max(seen_open) <= 16
    assert pool.open_sockets == 0 and fd_count() == before


@pytest.mark.parametrize("bind_host", ["127.0.0.1", "::", "::1"])
async def test_datagrams_arrive_with_their_slot(bind_host: str) -> None:
    if ":" in bind_host and not has_ipv6_loopback():
        pytest.skip("no IPv6 on this host")
    got: list[tuple[int, bytes, Address]] = []
    pool = SocketPool(8, bind_host=bind_host)
    peer_host = "::1" if bind_host == "::1" else "127.0.0.1"
    peer = plain_socket(peer_host)
    peer_addr = normalize(peer.getsockname())
    async with await pool.acquire(4, lambda *a: got.append(a)) as lease:
        for slot in lease.slots:
            port = lease.local_address(slot)[1]
            peer.sendto(b"to-%d" % slot, (peer_host, port))
        await until(lambda: len(got) == 4)
        assert sorted(got) == [(s, b"to-%d" % s, peer_addr) for s in (1, 2, 3, 4)]
        # And back: each slot answers from its own port.
        for slot in lease.slots:
            assert lease.send(slot, b"from-%d" % slot, peer_addr)
        replies = {}
        for _ in range(4):
            data, addr = await asyncio.to_thread(peer.recvfrom, 100)
            replies[data] = normalize(addr)[1]
        assert replies == {b"from-%d" % s: lease.local_address(s)[1] for s in lease.slots}
        if bind_host == "127.0.0.1":  # an IPv4 socket cannot send to an IPv6 peer
            assert not lease.send(1, b"x", ("::1", 9))
    peer.close()
    await pool.wait_closed()
    assert pool.open_sockets == 0


async def test_kept_socket_survives_the_lease() -> None:
    got: list[tuple[int, bytes, Address]] = []
    pool = SocketPool(8, bind_host="127.0.0.1")
    peer = plain_socket()
    peer_addr = normalize(peer.getsockname())
    lease = await pool.acquire(3, lambda *a: got.append(a))
    kept = lease.keep(2)
    assert lease.slots == (1, 3) and kept.slot == 2
    with pytest.raises(ValueError):
        lease.keep(2)
    # Until the new owner sets a callback, datagrams still reach the lease's, under slot 2.
    peer.sendto(b"early", kept.local_address)
    await until(lambda: got == [(2, b"early", peer_addr)])
    lease.close()
    await lease.wait_closed()
    assert pool.open_sockets == 1 and not kept.closed
    mine: list[tuple[bytes, Address]] = []
    kept.on_datagram = lambda data, src: mine.append((data, src))
    peer.sendto(b"late", kept.local_address)
    await until(lambda: mine == [(b"late", peer_addr)])
    assert kept.send(b"back", peer_addr)
    data, _ = await asyncio.to_thread(peer.recvfrom, 100)
    assert data == b"back"
    kept.close()
    await kept.wait_closed()
    assert pool.open_sockets == 0 and kept.closed and not kept.send(b"x", peer_addr)
    peer.close()


async def test_pool_close_closes_everything_and_fails_waiters() -> None:
    pool = SocketPool(4, bind_host="127.0.0.1")
    before = fd_count()
    lease = await pool.acquire(3, ignore)
    kept = lease.keep(1)
    waiter = asyncio.create_task(pool.acquire(4, ignore, timeout=None))
    await asyncio.sleep(0.01)
    pool.close()
    with pytest.raises(SocketPoolError, match="closed"):
        await waiter
    await pool.wait_closed()
    assert kept.closed and lease.closed and fd_count() == before and pool.open_sockets == 0
    with pytest.raises(SocketPoolError, match="closed"):
        await pool.acquire(1, ignore)


async def cycles(count: int = 100) -> None:
    pool = SocketPool(32, bind_host="127.0.0.1")
    fds = fd_count()
    tasks = len(asyncio.all_tasks())
    for i in range(count):
        lease = await pool.acquire(8 + i % 8, ignore)
        if i % 3 == 0:
            lease.keep(1).close()
        lease.close()
    await pool.wait_closed()
    await asyncio.sleep(0)
    assert fd_count() == fds and pool.open_sockets == 0 and pool.free == pool.limit
    assert len(asyncio.all_tasks()) == tasks and pool.peak <= 16


async def test_cycles_leave_nothing_behind() -> None:
    await cycles()


def test_cycles_leave_nothing_behind_on_uvloop() -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(cycles())


def test_uvloop_frees_places_only_when_closed() -> None:
    async def main() -> None:
        pool = SocketPool(4, bind_host="127.0.0.1")
        before = fd_count()
        lease = await pool.acquire(4, ignore)
        second = asyncio.create_task(pool.acquire(4, ignore, timeout=None))
        await asyncio.sleep(0.01)
        lease.close()
        got = await asyncio.wait_for(second, 2.0)
        assert fd_count() == before + 4 and pool.peak == 4
        got.close()
        await pool.wait_closed()
        assert fd_count() == before

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


def test_limit_respects_the_open_file_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    import resource

    def fake(soft: int) -> Callable[[int], tuple[int, int]]:
        return lambda _which: (soft, 1 << 20)

    monkeypatch.setattr(resource, "getrlimit", fake(1024))
    assert effective_limit(512) == 512 and effective_limit(2000) == 512
    monkeypatch.setattr(resource, "getrlimit", fake(256))
    assert effective_limit(512) == 128 and SocketPool(512).limit == 128
    monkeypatch.setattr(resource, "getrlimit", fake(resource.RLIM_INFINITY))
    assert effective_limit(4096) == 4096
    assert sockets_module.RLIMIT_SHARE == 0.5
    with pytest.raises(ValueError):
        effective_limit(0)


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_open_rate(loop_name: str) -> None:
    """Not a pass/fail bound: prints how long one full 256-socket attempt takes to open."""

    async def main() -> float:
        pool = SocketPool(256, bind_host="0.0.0.0")
        start = time.perf_counter()
        lease = await pool.acquire(256, ignore)
        elapsed = time.perf_counter() - start
        lease.close()
        await pool.wait_closed()
        return elapsed

    factory: Callable[[], asyncio.AbstractEventLoop] | None = (
        uvloop.new_event_loop if loop_name == "uvloop" else None
    )
    with asyncio.Runner(loop_factory=factory) as runner:
        elapsed = runner.run(main())
    print(f"\nsocket pool ({loop_name}): 256 sockets opened in {elapsed * 1000:.1f} ms")
