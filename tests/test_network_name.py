"""Network names (``[node] network``, ``--network``): the F_NETWORK codec field, nodes of two
networks that share one wire never learning each other, the public network's bytes unchanged,
and the config and command-line checks."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dhtnode.cli.common import config_from_args
from dhtnode.cli.main import build_parser
from dhtnode.crypto.identity import Identity
from dhtnode.daemon.config import Config, NodeConfig, apply_overrides, load_config
from dhtnode.daemon.wiring import params_from_config
from dhtnode.dht.node import DhtNode, DhtParams
from dhtnode.dht.rpc import AMPLIFICATION_LIMIT
from dhtnode.errors import ConfigError
from dhtnode.sim.network import SimHost, SimNetwork
from dhtnode.transport.udp import NodeEndpoint, open_udp_socket
from dhtnode.wire import messages as m
from dhtnode.wire.address import normalize
from dhtnode.wire.network import NETWORK_ID_LEN, PUBLIC_NETWORK, network_id

ALPHA = network_id("alpha")
BETA = network_id("beta")
networks = st.none() | st.binary(min_size=NETWORK_ID_LEN, max_size=NETWORK_ID_LEN)
addresses = st.one_of(
    st.tuples(st.ip_addresses(v=4).map(str), st.integers(1, 65535)),
    st.tuples(
        st.ip_addresses(v=6).filter(lambda ip: ip.ipv4_mapped is None).map(str),
        st.integers(1, 65535),
    ),
)


# ---------------------------------------------------------------------- codec


def test_network_id_derivation() -> None:
    assert network_id(PUBLIC_NETWORK) is None
    assert ALPHA is not None and len(ALPHA) == NETWORK_ID_LEN
    assert ALPHA != BETA
    # The documented derivation (docs/PROTOCOL.md): every implementation gets the same id.
    assert network_id("alpha") == bytes.fromhex("edee6050")


@given(st.sampled_from(list(m.Command)), st.integers(0, 2**32 - 1), networks,
       st.none() | st.binary(min_size=32, max_size=32), st.none() | st.binary(max_size=32),
       st.none() | st.binary(max_size=300), st.integers(0, 200))
def test_request_round_trip_with_network(cmd, tid, net, target, token, value, pad) -> None:  # type: ignore[no-untyped-def]
    req = m.Request(cmd, tid, None, target, token, value, pad, net)
    data = m.encode_request(req)
    assert m.decode(data) == req
    assert m.request_size(req) == len(data)
    assert bool(data[2] & m.F_NETWORK) == (net is not None)


@given(st.sampled_from(list(m.Command)), st.integers(0, 2**32 - 1), addresses, networks,
       st.none() | st.binary(max_size=32), st.none() | st.lists(addresses, max_size=10).map(tuple),
       st.none() | st.integers(0, 255), st.none() | st.binary(max_size=300), st.booleans())
def test_response_round_trip_net(cmd, tid, to, net, token, nodes, error, value, more) -> None:  # type: ignore[no-untyped-def]
    res = m.Response(cmd, tid, to, None, token, nodes, error, value, more, net)
    assert m.decode(m.encode_response(res)) == res


@given(st.integers(0, 2**32 - 1), addresses, networks, st.none() | st.binary(max_size=32),
       st.lists(addresses, max_size=20))
def test_nodes_fast_path_matches_with_network(tid, to, net, token, nodes) -> None:  # type: ignore[no-untyped-def]
    from dhtnode.wire import address as wire_address

    packed = [wire_address.encode(a) for a in nodes]
    fast = m.encode_nodes_response(m.Command.FIND_NODE, tid, to, None, packed, token, net)
    slow = m.encode_response(m.Response(m.Command.FIND_NODE, tid, to, None, token,
                                        tuple(nodes), network=net))
    assert fast == slow


@given(st.binary(max_size=64))
def test_flagged_garbage_raises_only_message_error(tail: bytes) -> None:
    data = bytes((0x10, 1, m.F_NETWORK, 1)) + bytes(4) + tail
    try:
        m.decode(data)
    except m.MessageError:
        pass


def test_public_network_bytes_unchanged_and_private_costs_4() -> None:
    """The public network sends exactly what it sent before networks existed; a named one 4
    bytes more each way, so the answer/request ratio stays under the 3x rule."""
    ping = m.Request(m.Command.PING, 7)
    assert m.encode_request(ping) == bytes.fromhex("1001000100000007")
    assert len(m.encode_request(dataclasses.replace(ping, network=ALPHA))) == 8 + 4
    to = ("198.51.100.1", 4000)
    pong = m.Response(m.Command.PING, 7, to, bytes(32))
    public = len(m.encode_response(pong))
    private = len(m.encode_response(dataclasses.replace(pong, network=ALPHA)))
    assert private == public + 4
    # Smallest request (bare PING, 8 + 28 header bytes) vs its answer, on the wire.
    assert (private + 28) <= AMPLIFICATION_LIMIT * (8 + 4 + 28)


def test_bad_network_id_length_is_refused() -> None:
    with pytest.raises(ValueError, match="4 bytes"):
        m.encode_request(m.Request(m.Command.PING, 1, network=b"abc"))


# ---------------------------------------------------------------------- engine, simulated


def _add(net: SimNetwork, network: bytes | None, **kw: object) -> SimHost:
    # SimNetwork gives every node its ``params``: switch them per node added.
    net.params = dataclasses.replace(net.params, network=network)
    return net.add_node(**kw)  # type: ignore[arg-type]


def test_two_networks_on_one_wire_never_merge() -> None:
    """Nodes of alpha, beta and the public network share one simulated wire, and every joiner
    is handed the bootstrap nodes of all three: each table holds only its own network."""
    net = SimNetwork(seed=5)
    groups: dict[bytes | None, list[SimHost]] = {ALPHA: [], BETA: [], None: []}
    boots = {name: _add(net, name, bootstrap_node=True) for name in groups}
    all_boots = tuple(b.addr for b in boots.values())
    for name, hosts in groups.items():
        hosts.append(boots[name])
        for _ in range(8):
            h = _add(net, name, seeds=all_boots)
            hosts.append(h)
            net.start(h, lambda n: n.bootstrap())
    net.run_until(net.now + 60.0)
    for name, hosts in groups.items():
        own = {h.addr for h in hosts}
        for h in hosts:
            table = {c.addr for c in h.node.table}
            assert table, f"a node of {name!r} has an empty table"
            assert table <= own, f"a node of {name!r} learned another network's nodes"
        assert sum(h.node.server for h in hosts) >= len(hosts) - 1
    # The other networks' bootstrap nodes saw requests they dropped, and counted them.
    for b in boots.values():
        assert b.node.stats["drop_other_network"] > 0


def test_lookup_stays_inside_its_network() -> None:
    net = SimNetwork(seed=9)
    a_boot = _add(net, ALPHA, bootstrap_node=True)
    b_boot = _add(net, BETA, bootstrap_node=True)
    seeds = (a_boot.addr, b_boot.addr)
    alphas = [_add(net, ALPHA, seeds=seeds) for _ in range(6)]
    betas = [_add(net, BETA, seeds=seeds) for _ in range(6)]
    for h in alphas + betas:
        net.start(h, lambda n: n.bootstrap())
    net.run_until(net.now + 30.0)
    from dhtnode.dht.ids import topic_from_name

    topic = topic_from_name("shared-topic-name")
    assert net.run_op(alphas[0], lambda n: n.announce(topic)).result() > 0
    found_alpha = net.run_op(alphas[3], lambda n: n.lookup(topic)).result()
    found_beta = net.run_op(betas[3], lambda n: n.lookup(topic)).result()
    assert [r.public_key for r in found_alpha.records] == [alphas[0].node.identity.public_key]
    assert found_beta.records == []


# ---------------------------------------------------------------------- real loopback sockets


async def _node(params: DhtParams, *, first: bool = False,
                seed: tuple[str, int] | None = None) -> NodeEndpoint:
    sock = open_udp_socket("127.0.0.1", 0)
    local = normalize(sock.getsockname())
    node = DhtNode(Identity.generate(), params, now=time.monotonic(), wall=time.time,
                   public_address=local if first else None, seeds=[seed] if seed else [])
    return await NodeEndpoint.create_on(sock, node)


async def test_loopback_same_name_joins_other_name_is_dropped() -> None:
    fast = DhtParams(request_timeout=0.3, slow_after=0.1)
    alpha = dataclasses.replace(fast, network=ALPHA)
    boot = await _node(alpha, first=True)
    eps = [boot]
    try:
        friend = await _node(alpha, seed=boot.local_address)
        stranger = await _node(dataclasses.replace(fast, network=BETA), seed=boot.local_address)
        public = await _node(fast, seed=boot.local_address)
        eps += [friend, stranger, public]
        sizes = await asyncio.gather(*(e.run(lambda n: n.bootstrap())
                                       for e in (friend, stranger, public)))
        assert sizes[0] >= 1
        assert sizes[1] == 0 and sizes[2] == 0
        assert boot.node.stats["drop_other_network"] >= 2
        assert {c.addr for c in friend.node.table} == {boot.local_address}
    finally:
        for e in eps:
            e.close()


# ---------------------------------------------------------------------- config and CLI


def test_config_default_is_public_and_reaches_the_engine() -> None:
    assert Config().node.network == PUBLIC_NETWORK
    assert params_from_config(Config()).network is None
    cfg = Config(node=NodeConfig(network="lab-7"))
    assert params_from_config(cfg).network == network_id("lab-7")


def test_config_file_network(tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / "c.toml"
    p.write_text('[node]\nnetwork = "testnet-1"\n')
    assert load_config(p).node.network == "testnet-1"


@pytest.mark.parametrize("bad", ["", "   ", "x" * 65, "tab\there", "new\nline", 7])
def test_config_network_errors_name_field_and_fix(tmp_path, bad: object) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / "c.toml"
    p.write_text(f"[node]\nnetwork = {json.dumps(bad)}\n")  # a JSON string is a TOML string
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert "node.network" in str(err.value)
    assert "printable" in str(err.value) and '"public"' in str(err.value)
    with pytest.raises(ConfigError, match="--network"):
        apply_overrides(Config(), network=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("verb", [["run"], ["lookup", "--topic-name", "x"], ["ping", "1.2.3.4:5"]])
def test_network_flag_on_run_and_client_verbs(verb: list[str]) -> None:
    args = build_parser().parse_args([*verb, "--network", "lab-7"])
    assert config_from_args(args).node.network == "lab-7"
