"""The NAT lab: real network namespaces, veth pairs, bridges and nftables NATs.

This module owns building and tearing down the lab and the nftables rule set of every kind of
host. Measuring what a kind really does, from outside with UDP sockets, is tests/natprobe.py.

Topology built by :class:`Lab`::

    "<prefix>-inet": bridge br0, the "internet": 203.0.113.0/24 and 2001:db8:113::/64
     |-- public host (open / firewalled)     eth0 203.0.113.a  [2001:db8:113::a]
     |-- NAT router                          wan0 203.0.113.b, nft NAT of its kind
     |     lan0 (bridge) 100.64.n.1/24
     |       |-- host 100.64.n.2             default via 100.64.n.1
     |       `-- host 100.64.n.3             same NAT: the hosts reach each other on the LAN
     `-- carrier router (cgnat)              wan0 203.0.113.c, masquerade
           lan0 (bridge) 100.100.m.1/24      the carrier LAN: a routed hop between the NATs
             `-- home router                 wan0 100.100.m.2, default via 100.100.m.1
                   lan0 100.64.k.1/24 -- host 100.64.k.2

Kinds of host (RFC 4787 mapping / filtering; tests/test_netlab_kinds.py measures each):

    open             public address, no NAT, no firewall
    firewalled       public address; a stateful host firewall drops new inbound UDP and TCP
    full-cone        endpoint-independent mapping, endpoint-independent filtering
    restricted       endpoint-independent mapping, address-dependent filtering
    port-restricted  endpoint-independent mapping, address-and-port-dependent (plain masquerade)
    symmetric        address-and-port-dependent mapping, random ports (masquerade fully-random)
    sequential       address-and-port-dependent mapping, ports handed out one after another
    cgnat            a home masquerade behind a carrier masquerade: EIM, APD through both

API::

    lab = Lab(); lab.start()                       # then lab.close() in a finally block
    lab.host(name, kind="open", ipv6=False) -> LabHost      # any kind; NAT kinds get a router
    lab.nat_router(name, kind="port-restricted", behind=None, carrier=False) -> NatRouter
    lab.host_behind(router, name) -> LabHost       # more hosts on one router's LAN
    lab.set_kind(router, kind)                     # re-apply rules and flush conntrack
    lab.public_host(name, kind="open", ipv6=False) -> (ns, ip)           # tuple forms
    lab.nat_host(name, kind="port-restricted") -> (ns, lan_ip, public_ip)

Address rules: the internet is only 203.0.113.0/24 and 2001:db8::/32 (documentation ranges),
LANs only 100.64.0.0/10 (shared address space); no namespace is connected to the machine's
real interfaces or to the root namespace. Everything the lab creates, and every process left
in it, goes with :meth:`Lab.close`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

INTERNET_PREFIX = "203.0.113"
INTERNET6_PREFIX = "2001:db8:113:"
HOME_LAN_PREFIX = "100.64"
CARRIER_LAN_PREFIX = "100.100"

PUBLIC_KINDS = ("open", "firewalled")
NAT_KINDS = ("full-cone", "restricted", "port-restricted", "symmetric", "sequential", "cgnat")
KINDS = PUBLIC_KINDS + NAT_KINDS

# The sequential NAT hands out ports SEQ_BASE, SEQ_BASE + 1, ... for each new outbound flow.
SEQ_BASE = 20000
SEQ_SIZE = 1000


@contextlib.contextmanager
def running_lab() -> Iterator[Lab]:
    """A started lab, closed (namespaces deleted) on the way out, also when the test fails;
    skips the test when the lab cannot run here."""
    import pytest

    reason = lab_available()
    if reason:
        pytest.skip(reason)
    lab = Lab()
    try:
        lab.start()
        yield lab
    finally:
        lab.close()


def lab_available() -> str | None:
    """None if the lab can run here, else the reason it cannot."""
    if os.geteuid() != 0:
        return "the NAT lab needs root (ip netns, nftables)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"the NAT lab needs `{tool}` (apt-get install iproute2 nftables)"
    return None


def _check_kind(kind: str, allowed: tuple[str, ...]) -> None:
    if kind not in allowed:
        raise ValueError(f"kind {kind!r} is not one of {', '.join(allowed)}")


def sh(*args: str, ns: str | None = None, check: bool = True, input: str | None = None) -> str:
    cmd = ["ip", "netns", "exec", ns, *args] if ns else list(args)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, input=input)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.strip()}")
    return out.stdout


# --- rule sets -------------------------------------------------------------------------------

_FIREWALL = """
table inet lab_fw {
  chain lab_input { type filter hook input priority filter; policy accept;
    iifname "lo" accept;
    ct state established,related accept;
    meta l4proto { udp, tcp } drop; }
}
"""

# A home router's IPv6: routed, no NAT, new inbound flows dropped (IPv4 is the NAT's job).
_FIREWALL_V6 = """
table ip6 lab_fw6 {
  chain lab_input { type filter hook input priority filter; policy accept;
    iifname "lo" accept;
    ct state established,related accept;
    meta l4proto { udp, tcp } drop; }
}
"""

# The full-cone map is filled after the NAT decision (postrouting, after srcnat), keyed by the
# mapped port, so any outside endpoint's packet to that port is sent to the inside socket.
_FULL_CONE_NAT = """
  map fc {{ type inet_service : ipv4_addr . inet_service; flags dynamic,timeout; timeout 300s; }}
  chain lab_pre {{ type nat hook prerouting priority dstnat;
    iifname "wan0" ip daddr {wan} meta l4proto udp dnat ip to udp dport map @fc; }}
  chain lab_record {{ type filter hook postrouting priority srcnat + 10;
    oifname "wan0" meta l4proto udp ct status snat \\
      update @fc {{ ct reply proto-dst timeout 300s : \\
                    ct original ip saddr . ct original proto-src }};
  }}
"""

_ROUTER = """
table ip lab_nat {{
{nat_extra}
  chain lab_post {{ type nat hook postrouting priority srcnat;
    {post}
  }}
}}
table ip lab_filter {{
{filter_extra}
  chain lab_forward {{ type filter hook forward priority filter; policy drop;
    {forward}
    iifname "lan0" accept;
    iifname "wan0" ct state established,related accept;
  }}
  chain lab_input {{ type filter hook input priority filter;
    iifname "wan0" ct state new drop;
  }}
}}
"""


def firewall_rules() -> str:
    """The stateful host firewall of a `firewalled` host (IPv4 and IPv6)."""
    return _FIREWALL


def router_rules(kind: str, wan_ip: str) -> str:
    """The nftables rule set of a NAT router of ``kind`` whose WAN address is ``wan_ip``.

    Every router drops new inbound flows on its WAN input: accepting them would let conntrack
    confirm an UNREPLIED entry, and the inside host's later packet would get another port."""
    _check_kind(kind, NAT_KINDS)
    post = 'oifname "wan0" masquerade;'
    nat_extra = filter_extra = forward = ""
    if kind == "symmetric":
        post = 'oifname "wan0" masquerade fully-random;'
    elif kind == "sequential":
        # numgen yields host-endian numbers, so an explicit map turns them into ports.
        ports = ", ".join(f"{i} : {SEQ_BASE + i}" for i in range(SEQ_SIZE))
        post = (f'oifname "wan0" meta l4proto udp snat ip to {wan_ip} : '
                f"numgen inc mod {SEQ_SIZE} map {{ {ports} }};\n"
                '    oifname "wan0" masquerade;')
    elif kind == "full-cone":
        nat_extra = _FULL_CONE_NAT.format(wan=wan_ip)
        forward = 'iifname "wan0" ct status dnat accept;'
    elif kind == "restricted":
        nat_extra = _FULL_CONE_NAT.format(wan=wan_ip)
        # (inside ip, inside port, remote ip) for every LAN-to-WAN packet: after the dnat an
        # inbound packet is let in only from an address that inside socket has sent to.
        filter_extra = ("  set contacted { type ipv4_addr . inet_service . ipv4_addr; "
                        "flags dynamic,timeout; timeout 300s; }")
        forward = ('iifname "lan0" oifname "wan0" meta l4proto udp '
                   "update @contacted { ip saddr . udp sport . ip daddr timeout 300s };\n"
                   '    iifname "wan0" ct status dnat '
                   "ip daddr . udp dport . ip saddr @contacted accept;")
    return _ROUTER.format(nat_extra=nat_extra, post=post, filter_extra=filter_extra,
                          forward=forward)


# Flushing conntrack over netlink (an IPCTNL_MSG_CT_DELETE without a tuple) spares the lab a
# dependency on the `conntrack` tool, which CI does not install.
_CT_FLUSH = """
import socket, struct
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)
s.settimeout(5)
s.send(struct.pack("=LHHLL", 20, 0x102, 5, 1, 0) + struct.pack("=BBH", 0, 0, 0))
err = struct.unpack("=i", s.recv(4096)[16:20])[0]
raise SystemExit(f"conntrack flush: errno {-err}" if err else 0)
"""


def flush_conntrack(ns: str) -> None:
    sh(sys.executable, "-c", _CT_FLUSH, ns=ns)


# --- the lab ---------------------------------------------------------------------------------


@dataclass
class NatRouter:
    """A NAT router namespace: ``wan0`` towards the internet (or towards the carrier LAN of the
    router ``upstream``), ``lan0`` a bridge for the hosts behind it."""

    name: str
    kind: str
    ns: str
    wan_ip: str  # its own WAN address
    public_ip: str  # what the internet sees: the outermost router's WAN address
    lan_prefix: str  # first three octets of its /24 LAN
    upstream: NatRouter | None = None
    hosts: list[LabHost] = field(default_factory=list)
    next_octet: int = 2

    @property
    def lan_ip(self) -> str:
        return f"{self.lan_prefix}.1"


@dataclass
class LabHost:
    """A host namespace. ``ip`` is its own IPv4 address, ``wan_ip`` the one the internet sees
    (the same for public hosts); ``ip6`` its IPv6 address if it has one."""

    name: str
    ns: str
    ip: str
    wan_ip: str
    kind: str
    ip6: str | None = None
    router: NatRouter | None = None


@dataclass
class Lab:
    prefix: str = field(default_factory=lambda: "dn" + uuid.uuid4().hex[:6])
    namespaces: list[str] = field(default_factory=list)
    hosts: dict[str, LabHost] = field(default_factory=dict)
    routers: dict[str, NatRouter] = field(default_factory=dict)
    _next_pub: int = 10
    _next_lan: int = 1
    _next_carrier: int = 1

    @property
    def inet(self) -> str:
        return f"{self.prefix}-inet"

    def _ns(self, name: str) -> str:
        ns = f"{self.prefix}-{name}"
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        sh("ip", "link", "set", "lo", "up", ns=ns)
        return ns

    def start(self) -> None:
        self._ns("inet")
        # No multicast snooping, so IPv6 neighbour discovery needs no MLD querier.
        sh("ip", "link", "add", "br0", "type", "bridge", "mcast_snooping", "0", ns=self.inet)
        sh("ip", "link", "set", "br0", "up", ns=self.inet)

    def _veth_into_bridge(self, ns: str, ifname: str, bridge_ns: str, bridge: str,
                          peer: str) -> None:
        sh("ip", "link", "add", ifname, "netns", ns, "type", "veth", "peer", "name", peer,
           "netns", bridge_ns)
        sh("ip", "link", "set", peer, "master", bridge, "up", ns=bridge_ns)

    def _wire_to_internet(self, ns: str, ifname: str, *, ipv6: bool = False) -> tuple[str, str]:
        """Connect ``ns`` to the internet bridge; returns (IPv4, IPv6 or "")."""
        n = self._next_pub
        if n > 254:
            raise RuntimeError("the lab's internet (203.0.113.0/24) is full")
        self._next_pub += 1
        ip = f"{INTERNET_PREFIX}.{n}"
        ip6 = f"{INTERNET6_PREFIX}:{n}" if ipv6 else ""
        if ipv6:
            # Addresses usable at once: no duplicate address detection, link-local included.
            sh("sysctl", "-q", "-w", "net.ipv6.conf.default.accept_dad=0", ns=ns)
        self._veth_into_bridge(ns, ifname, self.inet, "br0", f"v{n}{self.prefix[-4:]}")
        sh("ip", "addr", "add", f"{ip}/24", "dev", ifname, ns=ns)
        if ipv6:
            sh("ip", "-6", "addr", "add", f"{ip6}/64", "dev", ifname, "nodad", ns=ns)
        sh("ip", "link", "set", ifname, "up", ns=ns)
        return ip, ip6

    def _wire_v6_leg(self, ns: str, ifname: str) -> str:
        """An IPv6-only link from ``ns`` to the internet, behind a stateful IPv6 firewall;
        returns the IPv6 address."""
        n = self._next_pub
        if n > 254:
            raise RuntimeError("the lab's internet is full")
        self._next_pub += 1
        ip6 = f"{INTERNET6_PREFIX}:{n}"
        sh("sysctl", "-q", "-w", "net.ipv6.conf.default.accept_dad=0", ns=ns)
        self._veth_into_bridge(ns, ifname, self.inet, "br0", f"v{n}{self.prefix[-4:]}")
        sh("ip", "-6", "addr", "add", f"{ip6}/64", "dev", ifname, "nodad", ns=ns)
        sh("ip", "link", "set", ifname, "up", ns=ns)
        self._apply(ns, _FIREWALL_V6)
        return ip6

    def _wire_to_lan(self, ns: str, ifname: str, router: NatRouter) -> str:
        """Connect ``ns`` to ``router``'s LAN with a default route through it; returns its IP."""
        octet = router.next_octet
        if octet > 254:
            raise RuntimeError(f"the LAN of {router.name} is full")
        router.next_octet += 1
        ip = f"{router.lan_prefix}.{octet}"
        self._veth_into_bridge(ns, ifname, router.ns, "lan0", f"p{octet}")
        sh("ip", "addr", "add", f"{ip}/24", "dev", ifname, ns=ns)
        sh("ip", "link", "set", ifname, "up", ns=ns)
        sh("ip", "route", "add", "default", "via", router.lan_ip, ns=ns)
        return ip

    def _apply(self, ns: str, rules: str) -> None:
        sh("nft", "-f", "-", ns=ns, input=rules)

    def host(self, name: str, *, kind: str = "open", ipv6: bool = False) -> LabHost:
        """A host of any kind. NAT kinds get a router of their own, named ``<name>-r``."""
        if kind in PUBLIC_KINDS:
            ns = self._ns(name)
            ip, ip6 = self._wire_to_internet(ns, "eth0", ipv6=ipv6)
            if kind == "firewalled":
                self._apply(ns, firewall_rules())
            h = LabHost(name, ns, ip, ip, kind, ip6 or None)
            self.hosts[name] = h
            return h
        if ipv6:
            raise ValueError("the lab's NATs are IPv4 only; IPv6 hosts are open or firewalled")
        return self.host_behind(self.nat_router(f"{name}-r", kind=kind), name)

    def nat_router(self, name: str, *, kind: str = "port-restricted",
                   behind: NatRouter | None = None, carrier: bool = False,
                   _rules_of: str | None = None) -> NatRouter:
        """A NAT router with an empty LAN; put hosts on it with :meth:`host_behind`.

        ``behind``: wire its WAN into that router's LAN instead of the internet (a NAT behind a
        NAT). ``carrier``: number its LAN from 100.100.0.0/16, for routers behind it. kind
        "cgnat" is a home masquerade behind a carrier masquerade named ``<name>-cg`` (or behind
        ``behind``, to share one carrier). ``_rules_of`` is for the lab's self-tests only:
        claim ``kind`` but load the rules of another kind."""
        _check_kind(kind, NAT_KINDS)
        if kind == "cgnat" and behind is None:
            behind = self.nat_router(f"{name}-cg", kind="port-restricted", carrier=True)
        ns = self._ns(name)
        if behind is None:
            wan, _ = self._wire_to_internet(ns, "wan0")
        else:
            wan = self._wire_to_lan(ns, "wan0", behind)
        if carrier:
            n, self._next_carrier = self._next_carrier, self._next_carrier + 1
            lan_prefix = f"{CARRIER_LAN_PREFIX}.{n}"
        else:
            n, self._next_lan = self._next_lan, self._next_lan + 1
            lan_prefix = f"{HOME_LAN_PREFIX}.{n}"
        if n > 255:
            raise RuntimeError("the lab ran out of LAN prefixes")
        router = NatRouter(name, kind, ns, wan, behind.public_ip if behind else wan, lan_prefix,
                           behind)
        sh("ip", "link", "add", "lan0", "type", "bridge", "mcast_snooping", "0", ns=ns)
        sh("ip", "addr", "add", f"{lan_prefix}.1/24", "dev", "lan0", ns=ns)
        sh("ip", "link", "set", "lan0", "up", ns=ns)
        sh("sysctl", "-q", "-w", "net.ipv4.ip_forward=1", ns=ns)
        self._apply(ns, router_rules(_rules_of or kind, wan))
        self.routers[name] = router
        return router

    def host_behind(self, router: NatRouter, name: str, *, ipv6: bool = False) -> LabHost:
        """One more host on ``router``'s LAN; hosts on one LAN reach each other directly.

        ``ipv6``: the host also gets an IPv6 address on the internet, behind a stateful
        firewall and no NAT, as a home router routes IPv6 (a second link, "eth1", that
        carries IPv6 only; IPv4 still goes through the router)."""
        ns = self._ns(name)
        ip = self._wire_to_lan(ns, "eth0", router)
        ip6 = self._wire_v6_leg(ns, "eth1") if ipv6 else None
        h = LabHost(name, ns, ip, router.public_ip, router.kind, ip6, router=router)
        router.hosts.append(h)
        self.hosts[name] = h
        return h

    def set_kind(self, router: NatRouter, kind: str) -> None:
        """Replace ``router``'s rules by those of ``kind`` (or re-apply its own) and forget every
        flow it tracks, so no old mapping outlives the change."""
        if "cgnat" in (kind, router.kind) and kind != router.kind:
            raise ValueError("cgnat is a topology; it cannot be switched on or off")
        sh("nft", "flush", "ruleset", ns=router.ns)
        self._apply(router.ns, router_rules(kind, router.wan_ip))
        flush_conntrack(router.ns)
        router.kind = kind
        for h in router.hosts:
            h.kind = kind

    def public_host(self, name: str, *, kind: str = "open", ipv6: bool = False
                    ) -> tuple[str, str]:
        """A host directly on the internet; returns (namespace, its IPv4). See :meth:`host`."""
        _check_kind(kind, PUBLIC_KINDS)
        h = self.host(name, kind=kind, ipv6=ipv6)
        return h.ns, h.ip

    def nat_host(self, name: str, *, kind: str = "port-restricted") -> tuple[str, str, str]:
        """A host behind its own NAT router (``<name>-r``); returns (host namespace, host LAN
        IP, the public IP the internet sees for it). See :meth:`host`."""
        _check_kind(kind, NAT_KINDS)
        h = self.host(name, kind=kind)
        return h.ns, h.ip, h.wan_ip

    def close(self) -> None:
        for ns in reversed(self.namespaces):
            # Kill anything left running in it, then delete it.
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                                  timeout=10).stdout.split()
            for pid in pids:
                subprocess.run(["kill", "-9", pid], capture_output=True, timeout=10)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self.namespaces.clear()
        self.hosts.clear()
        self.routers.clear()
