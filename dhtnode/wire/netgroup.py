"""Which addresses count as one source: the host and prefix keys behind every per-source bound.

One attacker holds many ports of one IP for free, and an IPv6 customer holds a whole /64, so
"one source" cannot be one ``ip:port``. Every per-source bound in the node groups addresses
two ways, a *host* bounded strictly and a *prefix* bounded loosely (several honest nodes often
share one: a data centre, a lab, a Docker network):

* :func:`groups`, for contacts and witnesses (routing-table and closest-set diversity, the
  address observer): host = the IP address; prefix = the IPv4 /24 or the IPv6 /48 (a /48
  holds every /64 of a site, so it bounds a /64 as well). Loopback is exempt (None): test
  networks run dozens of nodes on 127.0.0.1, and nobody off the machine sends from there.
* :func:`source_keys`, for state kept per source (records, withdrawal markers, write rates):
  host = the IPv4 address or the IPv6 /64 (one customer's allocation, RFC 6177: counting
  exact IPv6 addresses would leave a /64 unbounded); prefix as above. Loopback is a source
  like any other.

Pure and memoised: the same few thousand peers come back over and over.
"""

from __future__ import annotations

import functools
import ipaddress

#: Addresses whose keys are memoised (parsing IPv6 through ``ipaddress`` costs microseconds).
GROUP_CACHE_SIZE = 16384


#: The IPv6 loopback address, packed.
_V6_LOOPBACK = ipaddress.IPv6Address("::1").packed


@functools.lru_cache(maxsize=GROUP_CACHE_SIZE)
def groups(ip: str) -> tuple[str, str] | None:
    """``(host, prefix)`` of a contact or witness at a canonical IP string: the IP, and its
    /24 or /48. None for loopback (exempt)."""
    if ":" not in ip:
        if ip.startswith("127."):
            return None
        prefix, _, last = ip.rpartition(".")
        if not prefix or not last.isdigit():
            return (ip, ip)  # not an IPv4 address (a test's label): its own source
        return (ip, prefix)
    raw = _v6(ip)
    if raw is None:
        return (ip, ip)
    if raw == _V6_LOOPBACK:
        return None
    return (ip, raw[:6].hex() + "/48")


@functools.lru_cache(maxsize=GROUP_CACHE_SIZE)
def source_keys(ip: str) -> tuple[str, str]:
    """``(host, prefix)`` of a source of stored state: the IPv4 address or the IPv6 /64, and
    the /24 or /48. Loopback is not exempt here; a string that is no IP is its own source."""
    if ":" not in ip:
        return groups(ip) or (ip, "127")
    raw = _v6(ip)
    if raw is None:
        return (ip, ip)
    return (raw[:8].hex() + "/64", raw[:6].hex() + "/48")


def _v6(ip: str) -> bytes | None:
    try:
        return ipaddress.IPv6Address(ip).packed
    except ValueError:
        return None
