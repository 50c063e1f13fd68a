"""The NAT lab: real network namespaces, veth pairs, a bridge and nftables NATs.

Topology built by :class:`Lab`::

    [pub hosts 203.0.113.x] --veth--+
                                     +-- bridge in "<prefix>-inet" (the "internet")
    [router: wan 203.0.113.y] -------+
       | nft NAT (masquerade, or fully-random masquerade for a symmetric NAT)
    [router: lan 100.64.n.1] --veth-- [lan host 100.64.n.2, default route via the router]

Only 203.0.113.0/24 (TEST-NET-3) and 100.64.0.0/10 (shared address space) are used, and no
namespace is connected to the machine's real interfaces. Everything the lab creates is
deleted by :meth:`Lab.close`, which the tests call in ``finally`` blocks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass, field

INTERNET_PREFIX = "203.0.113"


def lab_available() -> str | None:
    """None if the lab can run here, else the reason it cannot."""
    if os.geteuid() != 0:
        return "the NAT lab needs root (ip netns, nftables)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"the NAT lab needs `{tool}` (apt-get install iproute2 nftables)"
    return None


def sh(*args: str, ns: str | None = None, check: bool = True) -> str:
    cmd = ["ip", "netns", "exec", ns, *args] if ns else list(args)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.strip()}")
    return out.stdout


@dataclass
class Lab:
    prefix: str = field(default_factory=lambda: "dn" + uuid.uuid4().hex[:6])
    namespaces: list[str] = field(default_factory=list)
    _next_pub: int = 10
    _next_lan: int = 1

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
        sh("ip", "link", "add", "br0", "type", "bridge", ns=self.inet)
        sh("ip", "link", "set", "br0", "up", ns=self.inet)

    def _wire_to_internet(self, ns: str, ifname: str) -> str:
        ip = f"{INTERNET_PREFIX}.{self._next_pub}"
        self._next_pub += 1
        peer = f"v{self._next_pub}{self.prefix[-4:]}"
        sh("ip", "link", "add", ifname, "netns", ns, "type", "veth", "peer", "name", peer,
           "netns", self.inet)
        sh("ip", "link", "set", peer, "master", "br0", ns=self.inet)
        sh("ip", "link", "set", peer, "up", ns=self.inet)
        sh("ip", "addr", "add", f"{ip}/24", "dev", ifname, ns=ns)
        sh("ip", "link", "set", ifname, "up", ns=ns)
        return ip

    def public_host(self, name: str) -> tuple[str, str]:
        """A host directly on the internet; returns (namespace, its IP)."""
        ns = self._ns(name)
        return ns, self._wire_to_internet(ns, "eth0")

    def nat_host(self, name: str, *, kind: str = "port-restricted") -> tuple[str, str, str]:
        """A host behind its own NAT router; returns (host namespace, host LAN IP, router WAN IP).

        kind: "port-restricted" (plain masquerade: endpoint-independent mapping,
        address-and-port-dependent filtering) or "symmetric" (fully-random masquerade)."""
        router = self._ns(f"{name}-r")
        host = self._ns(name)
        wan = self._wire_to_internet(router, "wan0")
        n = self._next_lan
        self._next_lan += 1
        lan_net = f"100.64.{n}"
        sh("ip", "link", "add", "lan0", "netns", router, "type", "veth", "peer", "name", "eth0",
           "netns", host)
        sh("ip", "addr", "add", f"{lan_net}.1/24", "dev", "lan0", ns=router)
        sh("ip", "link", "set", "lan0", "up", ns=router)
        sh("ip", "addr", "add", f"{lan_net}.2/24", "dev", "eth0", ns=host)
        sh("ip", "link", "set", "eth0", "up", ns=host)
        sh("ip", "route", "add", "default", "via", f"{lan_net}.1", ns=host)
        sh("sysctl", "-q", "-w", "net.ipv4.ip_forward=1", ns=router)
        masq = "masquerade fully-random" if kind == "symmetric" else "masquerade"
        rules = f"""
table ip nat {{
  chain lab_post {{ type nat hook postrouting priority srcnat; oifname "wan0" {masq}; }}
}}
table ip filter {{
  chain lab_forward {{ type filter hook forward priority filter; policy drop;
    iifname "lan0" accept;
    iifname "wan0" ct state established,related accept; }}
  chain lab_input {{ type filter hook input priority filter;
    iifname "wan0" ct state new drop; }}
}}
"""
        subprocess.run(["ip", "netns", "exec", router, "nft", "-f", "-"], input=rules,
                       text=True, check=True, capture_output=True, timeout=30)
        return host, f"{lan_net}.2", wan

    def close(self) -> None:
        for ns in reversed(self.namespaces):
            # Kill anything left running in it, then delete it.
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                                  timeout=10).stdout.split()
            for pid in pids:
                subprocess.run(["kill", "-9", pid], capture_output=True, timeout=10)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self.namespaces.clear()
