"""Bootstrap names are resolved again whenever the daemon rejoins: when the engine's table
empties (``DhtNode.on_rejoin``, called from a growth tick) and on every SIGHUP reload. The
resolver is the event loop's ``getaddrinfo``, monkeypatched so that the name's answer
changes between joins; no /etc/hosts, no DNS."""

from __future__ import annotations

import asyncio
import shutil
import socket
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from dhtnode.crypto.identity import Identity
from dhtnode.daemon.config import Config, NodeConfig
from dhtnode.daemon.service import Daemon
from dhtnode.dht.node import DhtNode, DhtParams
from dhtnode.sim.network import SimNetwork
from dhtnode.transport.udp import NodeEndpoint, open_udp_socket
from dhtnode.wire.address import Address

NAME = "seed.dhtnode.test"


def test_engine_asks_for_fresh_seeds_when_its_table_is_empty() -> None:
    """The sans-I/O side: a growth tick with an empty table calls ``on_rejoin`` first, and
    the seeds the driver put in are the ones the rejoin lookup asks."""
    net = SimNetwork(seed=3)
    old = net.add_node(bootstrap_node=True)
    new = net.add_node(bootstrap_node=True)
    joiner = net.add_node(seeds=(old.addr,))
    calls: list[float] = []

    def rejoin() -> None:
        calls.append(net.now)
        joiner.node.queries.seeds = [new.addr]  # what a driver does after resolving again

    joiner.node.on_rejoin = rejoin
    assert net.run_op(joiner, lambda n: n.bootstrap()).result() == 1
    net.kill(old.addr)
    # Forget the dead seed's contact (as repeated failures would) so the table is empty.
    joiner.node.table.remove(old.addr)
    net.run_until(net.now + 40.0, stop=lambda: len(joiner.node.table) > 0)
    assert calls, "the empty table never asked for fresh seeds"
    assert {c.addr for c in joiner.node.table} == {new.addr}


class Resolver:
    """A stand-in for the loop's getaddrinfo: NAME answers with ``ip`` (changeable)."""

    def __init__(self, ip: str, real: Any) -> None:
        self.ip = ip
        self.asked = 0
        self._real = real

    async def __call__(self, host: str, port: int, *args: Any, **kw: Any) -> Any:
        if host != NAME:
            return await self._real(host, port, *args, **kw)
        self.asked += 1
        return [(socket.AF_INET, socket.SOCK_DGRAM, 17, "", (self.ip, port))]


async def _seed_node(ip: str, port: int) -> NodeEndpoint:
    sock = open_udp_socket(ip, port)
    node = DhtNode(Identity.generate(), DhtParams(request_timeout=0.3, slow_after=0.1),
                   now=time.monotonic(), wall=time.time, public_address=(ip, port))
    return await NodeEndpoint.create_on(sock, node)


def _free_port() -> int:
    """A UDP port free on both 127.0.0.1 and 127.0.0.2 (the two addresses NAME takes)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a:
            a.bind(("127.0.0.1", 0))
            port = int(a.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as b:
                try:
                    b.bind(("127.0.0.2", port))
                except OSError:
                    continue
            return port
    raise AssertionError("no port free on both loopback addresses")


async def _until(cond: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        await asyncio.sleep(0.02)
    return bool(cond())


@pytest.fixture
async def moving_seed(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[
        tuple[Daemon, Resolver, NodeEndpoint, NodeEndpoint]]:
    """A daemon bootstrapping through NAME:PORT, NAME resolving to 127.0.0.1 (seed A) until
    the test changes it to 127.0.0.2 (seed B, same port)."""
    loop = asyncio.get_running_loop()
    resolver = Resolver("127.0.0.1", loop.getaddrinfo)
    monkeypatch.setattr(loop, "getaddrinfo", resolver)
    port = _free_port()
    a = await _seed_node("127.0.0.1", port)
    b = await _seed_node("127.0.0.2", port)
    state = Path(tempfile.mkdtemp(prefix="dn-res-", dir="/tmp"))  # short: a control socket
    state.chmod(0o700)
    cfg = Config(node=NodeConfig(host="127.0.0.1", port=0, bootstrap=((NAME, port),),
                                 state_dir=state))
    daemon = Daemon(cfg, reload=lambda: cfg)
    await daemon.start()
    try:
        assert await _until(lambda: len(daemon.node.table) > 0)
        assert {c.addr for c in daemon.node.table} == {("127.0.0.1", port)}
        yield daemon, resolver, a, b
    finally:
        await daemon.stop()
        a.close()
        b.close()
        shutil.rmtree(state, ignore_errors=True)


def _move(daemon: Daemon, resolver: Resolver, a: NodeEndpoint) -> Address:
    """Seed A goes away and NAME now points at 127.0.0.2; the daemon's table empties."""
    a.close()
    resolver.ip = "127.0.0.2"
    old = a.local_address
    daemon.node.table.remove(old)
    assert len(daemon.node.table) == 0
    return ("127.0.0.2", old[1])


async def test_rejoin_resolves_the_name_again(moving_seed: Any) -> None:
    daemon, resolver, a, _ = moving_seed
    asked = resolver.asked
    new = _move(daemon, resolver, a)
    # What the engine's growth tick does with an empty table (its delay is seconds away).
    daemon.node.on_rejoin()
    assert await _until(lambda: new in {c.addr for c in daemon.node.table})
    assert resolver.asked == asked + 1
    assert new in daemon.node.queries.seeds
    assert a.local_address not in daemon.node.queries.seeds  # the old answer is replaced


async def test_reload_resolves_the_name_again(moving_seed: Any) -> None:
    daemon, resolver, a, _ = moving_seed
    new = _move(daemon, resolver, a)
    applied = await daemon.reload()  # the same configuration: the name is resolved anyway
    assert "node.bootstrap" not in applied  # nothing changed in the file
    assert await _until(lambda: new in {c.addr for c in daemon.node.table})


async def test_unresolvable_name_keeps_the_old_addresses(
        moving_seed: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    daemon = moving_seed[0]

    async def fail(*args: Any, **kw: Any) -> Any:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    before = list(daemon.node.queries.seeds)
    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", fail)
    daemon.node.on_rejoin()
    await asyncio.sleep(0.1)
    assert daemon.node.queries.seeds == before

