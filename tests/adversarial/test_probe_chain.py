"""The reachability chain sends probes only where they were asked for: over a whole simulated
network's life (joins, checks, re-checks), every PROBE goes to a node that sent a
CHECK_REACHABLE, and every FORWARD_PROBE goes to a node that had itself sent a request to the
forwarder (or, for a helper a check named, one the forwarder had sent a request to); the
checks still make every public node a server and no NATed one."""

from __future__ import annotations

from typing import Any

import pytest

from dhtnode.dht.node import DhtParams
from dhtnode.sim.network import SimHost, SimNetwork
from dhtnode.wire import address as wire_address
from dhtnode.wire import messages as m
from dhtnode.wire.address import Address

PARAMS = DhtParams(record_ttl=120.0)


@pytest.mark.parametrize("seed", [4, 5, 11])  # 4 and 11 send FORWARD_PROBEs to named helpers
def test_probes_go_only_to_askers(seed: int) -> None:
    net = SimNetwork(seed=seed, params=PARAMS)
    #: (time, sender, destination, request) of every request sent.
    log: list[tuple[float, Address, Address, m.Request]] = []

    def spy(host: SimHost) -> None:
        orig = host.node.datagrams_to_send

        def sent() -> list[tuple[bytes, Address]]:
            out = orig()
            for data, dest in out:
                if data[:1] == b"\x10":
                    msg = m.decode(data)
                    assert isinstance(msg, m.Request)
                    log.append((net.now, host.addr, dest, msg))
            return out

        host.node.datagrams_to_send = sent  # type: ignore[method-assign]

    first = net.add_node(bootstrap_node=True)
    spy(first)
    hosts = [first]
    for i in range(40):
        h = net.add_node(seeds=(first.addr,), firewalled=i % 5 == 4)
        spy(h)
        hosts.append(h)
        net.start(h, lambda node: node.bootstrap())
        if i % 10 == 9:
            net.run_until(net.now + 3.0)
    net.run_until(net.now + 700.0)  # past a re-check of every server

    asked_by: dict[Address, float] = {}  # checked node -> first CHECK_REACHABLE it sent
    requested: set[tuple[Address, Address]] = set()  # (requester, responder) pairs so far
    probes = forwards = 0
    stats: dict[str, Any] = {}
    for when, sender, dest, req in log:
        if req.command is m.Command.CHECK_REACHABLE:
            asked_by.setdefault(sender, when)
        elif req.command is m.Command.FORWARD_PROBE:
            forwards += 1
            # A helper the forwarder picked asked it something; a helper a check named
            # (the checked node's reserved helper, PROTOCOL.md "Probe reserve") must be one
            # the forwarder has dealt with itself (a routing-table contact): never an
            # arbitrary address.
            assert (dest, sender) in requested or (sender, dest) in requested, (
                "FORWARD_PROBE to a node that never asked us and that we never asked")
            target, _ = wire_address.decode(req.value or b"")
            assert target in asked_by, "FORWARD_PROBE names a node that never asked a check"
        elif req.command is m.Command.PROBE:
            probes += 1
            assert dest in asked_by and asked_by[dest] <= when, "PROBE to a node that did not ask"
        if req.command is not m.Command.PROBE:
            requested.add((sender, dest))
    for h in hosts:
        for k, v in h.node.stats.items():
            if "forward_probe" in k or "check_reachable" in k:
                stats[k] = stats.get(k, 0) + v
    public = [h for h in hosts if not h.firewalled]
    walled = [h for h in hosts if h.firewalled]
    print(f"\n{len(asked_by)} nodes asked checks; {forwards} FORWARD_PROBEs, {probes} PROBEs, "
          f"all to askers; servers: {sum(h.node.server for h in public)}/{len(public)} public, "
          f"{sum(h.node.server for h in walled)}/{len(walled)} NATed; {stats}")
    assert probes > 0 and forwards > 0
    assert all(h.node.server for h in public)
    assert not any(h.node.server for h in walled)
