"""This host's own IPv6 addresses, as a peer could reach them: what a node tells the other side
of an introduction when the DHT itself runs over IPv4 and has never shown us an IPv6 address
(so IPv6 can be raced beside the IPv4 punch, see ``nat/candidates.py``).

Two ways, first that answers: ask the kernel which source address it would use toward a
global IPv6 destination (a UDP ``connect`` sends nothing), else read the interfaces' global
addresses from ``/proc/net/if_inet6`` (Linux; hosts on a link with no default route, as in
the NAT lab). Owns only the finding; it sends nothing and decides nothing.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from pathlib import Path

from dhtnode.nat.candidates import usable_v6

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
