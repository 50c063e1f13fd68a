"""This host's own IPv6 addresses, as a peer could reach them: what a node tells the other side
of an introduction when the DHT itself runs over IPv4 and has never shown us an IPv6 address
(so IPv6 can be raced beside the IPv4 punch, see ``nat/candidates.py``).

Two ways, first that answers: ask the kernel which source address it would use toward a
global IPv6 destination (a UDP ``connect`` sends nothing), else read the interfaces' global
addresses from ``/proc/net/if_inet6`` (Linux; hosts on a link with no default route, as in
the NAT lab). Also our LAN addresses (the kernel's source address toward known nodes).
Owns only the finding; it sends nothing and decides nothing.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from pathlib import Path

from dhtnode.nat.candidates import usable_v6
from dhtnode.wire.address import Address, is_loopback

#: A destination in 2000::/3 (global unicast) for the kernel's source-address choice. Nothing
#: is sent to it: connecting a UDP socket only picks a route and a source.
ROUTE_PROBE_V6 = "2000::1"
#: Where Linux lists every interface address: hex address, ifindex, prefix length, scope,
#: flags, name.
IF_INET6 = Path("/proc/net/if_inet6")
#: Scope 0 is global in ``if_inet6``; flags that make an address unusable for new flows:
#: IFA_F_DADFAILED (0x08), IFA_F_DEPRECATED (0x20), IFA_F_TENTATIVE (0x40).
_SCOPE_GLOBAL = 0
_UNUSABLE_FLAGS = 0x08 | 0x20 | 0x40
#: Addresses returned at most (what a PeerInfo carries, with one IPv4 beside them).
MAX_OWN_V6 = 2
#: LAN addresses found at most (a PeerInfo carries 4), from the first known nodes.
MAX_LAN = 4


def lan_addresses(port: int, peers: list[Address]) -> tuple[Address, ...]:
    """Our LAN addresses with ``port``: the source address the kernel would use toward each
    of the first known nodes (``connect`` on a UDP socket sends nothing)."""
    out: list[Address] = []
    for peer in peers[:MAX_LAN]:
        fam = socket.AF_INET6 if ":" in peer[0] else socket.AF_INET
        with contextlib.suppress(OSError), socket.socket(fam, socket.SOCK_DGRAM) as s:
            s.connect(peer)
            ip = s.getsockname()[0]
            if (ip, port) not in out:
                out.append((ip, port))
    return tuple(out)


def own_v6_for(local: Address, peers: list[Address]) -> tuple[Address, ...]:
    """Our IPv6 addresses with the port of ``local`` (an IPv6 socket's address): the bound
    one if the socket is bound to one, else what the host has. Nothing for a DHT on loopback
    (tests): its peers are on this host, and the host's interface addresses would only send
    the race out of the loopback network."""
    if all(is_loopback(p[0]) for p in peers):
        return ()
    bound, port = local
    v6 = next((p[0] for p in peers if ":" in p[0]), None)
    ips = [bound] if bound != "::" else own_v6_addresses(v6)
    return tuple((ip, port) for ip in ips if usable_v6(ip))


def own_v6_addresses(toward: str | None = None, limit: int = MAX_OWN_V6) -> list[str]:
    """This host's usable IPv6 addresses, the kernel's choice toward ``toward`` (or a global
    destination) first; [] when the host has none."""
    out: list[str] = []
    for dest in dict.fromkeys(d for d in (toward, ROUTE_PROBE_V6) if d):
        ip = _source_toward(dest)
        if ip and usable_v6(ip) and ip not in out:
            out.append(ip)
    for ip in _interface_addresses():
        if ip not in out:
            out.append(ip)
    return out[:limit]


def _source_toward(dest: str) -> str | None:
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.connect((dest, 9))
        return str(s.getsockname()[0]).split("%", 1)[0]
    return None


def _interface_addresses() -> list[str]:
    try:
        lines = IF_INET6.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split()
        if len(parts) < 6:
            continue
        try:
            scope, flags = int(parts[3], 16), int(parts[4], 16)
            ip = str(ipaddress.IPv6Address(bytes.fromhex(parts[0])))
        except ValueError:
            continue
        if scope == _SCOPE_GLOBAL and not flags & _UNUSABLE_FLAGS and usable_v6(ip):
            out.append(ip)
    return out
