"""Self-tests of the NAT lab: every kind of host measured from outside with real UDP sockets.

Each kind in tests/netlab.py must show the RFC 4787 mapping and filtering it claims
(tests/natprobe.py measures, natprobe.EXPECTED says what is claimed), and a router built with
the wrong rules must fail that check. Also checked: hosts behind one NAT reach each other on
their LAN, the cgnat's two NATs have a routed hop between them, a pair of firewalled IPv6 hosts
let each other in only once each has sent, and the lab keeps to its address ranges. One lab
serves the whole module.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
from collections.abc import Iterator

import pytest

from tests import natprobe
from tests.natprobe import APD, EI, SETTLE, NatBehaviour, Observatory, problems, token
from tests.netlab import KINDS, NAT_KINDS, SEQ_BASE, SEQ_SIZE, Lab, LabHost, running_lab, sh

pytestmark = [pytest.mark.netns, pytest.mark.slow]

ALLOWED_NETS = [ipaddress.ip_network(n) for n in (
    "203.0.113.0/24", "198.51.100.0/24", "100.64.0.0/10", "2001:db8::/32",
    "127.0.0.0/8", "::1/128", "fe80::/10",
)]


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with running_lab() as lab:
        yield lab


@pytest.fixture(scope="module")
def obs(lab: Lab) -> Iterator[Observatory]:
    with Observatory(lab) as o:
        yield o


class Kinds:
    """One host of each kind, built and measured on first use."""

    def __init__(self, lab: Lab, obs: Observatory) -> None:
        self.lab, self.obs = lab, obs
        self.hosts: dict[str, LabHost] = {}
        self.measured: dict[str, NatBehaviour] = {}

    def host(self, kind: str) -> LabHost:
        if kind not in self.hosts:
            self.hosts[kind] = self.lab.host(kind, kind=kind)
        return self.hosts[kind]

    def measure(self, kind: str) -> NatBehaviour:
        if kind not in self.measured:
            self.measured[kind] = self.obs.measure(self.host(kind))
        return self.measured[kind]


@pytest.fixture(scope="module")
def kinds(lab: Lab, obs: Observatory) -> Kinds:
    return Kinds(lab, obs)


@pytest.mark.parametrize("kind", KINDS)
def test_kind_measures_as_claimed(kinds: Kinds, kind: str) -> None:
    b = kinds.measure(kind)
    host = kinds.host(kind)
    assert not problems(kind, b), f"{kind}: {b.row()}"
    # The internet sees the host's own address, or its outermost router's.
    assert b.public_ip == host.wan_ip
    if kind in NAT_KINDS:
        assert host.router is not None and host.wan_ip == host.router.public_ip != host.ip
    else:
        assert host.wan_ip == host.ip


def test_restricted_and_port_restricted_measure_differently(kinds: Kinds) -> None:
    r, pr = kinds.measure("restricted"), kinds.measure("port-restricted")
    assert r.mapping == pr.mapping == EI
    assert (r.filtering, pr.filtering) == (natprobe.AD, APD)


def test_port_behaviour_of_the_symmetric_kinds(kinds: Kinds) -> None:
    seq, sym = kinds.measure("sequential"), kinds.measure("symmetric")
    # Sequential: every new flow takes the next port of the NAT's pool.
    assert all(SEQ_BASE <= p < SEQ_BASE + SEQ_SIZE for p in seq.ports), seq.row()
    assert [b - a for a, b in itertools.pairwise(seq.ports)] == [1] * 4
    # Random: a new port for each destination, with no step to predict.
    assert len(set(sym.ports)) == len(sym.ports) and sym.port_step is None, sym.row()


def test_a_wrong_rule_set_fails_the_self_test(lab: Lab, obs: Observatory) -> None:
    # Claimed full cone, built with plain masquerade: the measurement must catch it.
    router = lab.nat_router("fake-r", kind="full-cone", _rules_of="port-restricted")
    host = lab.host_behind(router, "fake")
    assert host.kind == "full-cone"
    b = obs.measure(host)
    assert problems("full-cone", b), f"a masquerade passed as full cone: {b.row()}"
    assert b.filtering == APD
    # Re-applying the right rules (and flushing conntrack) makes it a full cone.
    lab.set_kind(router, "full-cone")
    b = obs.measure(host)
    assert not problems("full-cone", b), b.row()
    assert b.filtering == EI


def test_hosts_behind_one_nat_reach_each_other_on_the_lan(lab: Lab, obs: Observatory) -> None:
    router = lab.nat_router("shared-r", kind="port-restricted")
    h1, h2 = lab.host_behind(router, "shared1"), lab.host_behind(router, "shared2")
    assert h1.ip != h2.ip and h1.wan_ip == h2.wan_ip == router.public_ip
    a1, a2 = obs.agent(h1), obs.agent(h2)
    (s1, p1), (s2, p2) = a1.bind(), a2.bind()
    t1, t2 = token("lan"), token("lan")
    a1.send(s1, (h2.ip, p2), t1)
    assert a2.recv(s2, [t1], 2.0) == {t1: (h1.ip, p1)}  # direct: no translation
    a2.send(s2, (h1.ip, p1), t2)
    assert a1.recv(s1, [t2], 2.0) == {t2: (h2.ip, p2)}
    # Both still go out through the router.
    for h in (h1, h2):
        b = obs.measure(h)
        assert b.public_ip == router.public_ip and not problems("port-restricted", b), b.row()


def test_cgnat_has_a_routed_hop_between_its_nats(kinds: Kinds, obs: Observatory) -> None:
    host = kinds.host("cgnat")
    home = host.router
    assert home is not None and home.upstream is not None
    carrier = home.upstream
    shared = ipaddress.ip_network("100.64.0.0/10")
    assert ipaddress.ip_address(host.ip) in shared
    assert ipaddress.ip_address(home.wan_ip) in shared
    assert home.wan_ip.startswith(carrier.lan_prefix + ".")
    assert host.wan_ip == home.public_ip == carrier.wan_ip
    ag, a = obs.agent(host), obs.agent(obs.a)
    (s, _), (sa, pa) = ag.bind(), a.bind()
    # TTL 2 passes the home NAT and dies at the carrier router; TTL 3 gets out.
    t2, t3 = token("ttl2"), token("ttl3")
    ag.send(s, (obs.a.ip, pa), t2, ttl=2)
    assert a.recv(sa, [t2], SETTLE) == {}
    ag.send(s, (obs.a.ip, pa), t3, ttl=3)
    got = a.recv(sa, [t3], 2.0)
    assert t3 in got and got[t3][0] == carrier.wan_ip


def test_firewalled_ipv6_pair_opens_only_by_sending_first(lab: Lab, obs: Observatory) -> None:
    h1 = lab.host("v6a", kind="firewalled", ipv6=True)
    h2 = lab.host("v6b", kind="firewalled", ipv6=True)
    assert h1.ip6 and h2.ip6
    assert all(ipaddress.ip_address(h.ip6 or "") in ALLOWED_NETS[3] for h in (h1, h2))
    a1, a2, x = obs.agent(h1), obs.agent(h2), obs.agent(obs.stranger)
    (s1, p1), (s2, p2), (sx, _) = a1.bind(6), a2.bind(6), x.bind(6)
    to1, to2 = (h1.ip6, p1), (h2.ip6, p2)
    # Strangers stay out.
    tx1, tx2 = token("x"), token("x")
    x.send(sx, to1, tx1, count=2)
    x.send(sx, to2, tx2, count=2)
    assert a1.recv(s1, [tx1], SETTLE) == {} and a2.recv(s2, [tx2], 0.1) == {}
    # h1 sends first: h2's firewall drops it, but h1's now expects h2.
    t = token("1to2")
    a1.send(s1, to2, t)
    assert a2.recv(s2, [t], SETTLE) == {}
    t = token("2to1")
    a2.send(s2, to1, t)
    assert a1.recv(s1, [t], 2.0) == {t: to2}
    # Both have sent: both firewalls are open for this pair of sockets.
    t = token("1to2")
    a1.send(s1, to2, t)
    assert a2.recv(s2, [t], 2.0) == {t: to1}
    # And as seen from outside over IPv6: no translation, filtering per address and port.
    b = obs.measure(h1, family=6)
    assert not problems("firewalled", b), b.row()


def test_lab_keeps_to_its_address_ranges(kinds: Kinds, lab: Lab) -> None:
    for kind in KINDS:
        kinds.host(kind)
    for ns in lab.namespaces:
        for link in json.loads(sh("ip", "-j", "addr", "show", ns=ns)):
            for a in link.get("addr_info", []):
                addr = ipaddress.ip_address(a["local"])
                assert any(addr in n for n in ALLOWED_NETS), f"{ns} {link['ifname']}: {addr}"
