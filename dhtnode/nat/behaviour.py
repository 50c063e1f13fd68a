"""The words for a NAT's behaviour, in RFC 4787 terms: one vocabulary for ``status``,
``netcheck`` and the logs, so that a user comparing them reads the same word for the same thing.

Mapping (RFC 4787 section 4.1: does the public port depend on the destination?):

* :data:`MAPPING_NONE`: no NAT on the way (others see our own address and port);
* :data:`ENDPOINT_INDEPENDENT`: the same public address and port towards every destination;
* :data:`ADDRESS_DEPENDENT` / :data:`ADDRESS_AND_PORT_DEPENDENT`: another one per destination
  IP / per destination IP and port (told apart only when two answering nodes share an IP);
* :data:`ENDPOINT_DEPENDENT`: another one per destination, one of the two above;
* :data:`UNKNOWN`: too few answers to tell.

Filtering (section 5: whom does the NAT let in once we have sent out?):

* :data:`ENDPOINT_INDEPENDENT`: anyone (a stranger's datagram reached us unsolicited);
* :data:`FILTERING_STRICT`: strangers' probes were sent and none arrived: address-dependent or
  address-and-port-dependent (no probe comes from a known IP on another port, so the two are
  not told apart);
* :data:`UNKNOWN`: not measured.

Pure: names and mappings from what other modules measured; no I/O.
"""

from __future__ import annotations

from dhtnode.nat.observer import NatClass

#: No NAT: others see our own address and port.
MAPPING_NONE = "none"
#: The same public address and port for every destination (mapping), or anyone may send in
#: (filtering).
ENDPOINT_INDEPENDENT = "endpoint-independent"
#: Another mapping per destination IP.
ADDRESS_DEPENDENT = "address-dependent"
#: Another mapping per destination IP and port.
ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"
#: Another mapping per destination; no two answering nodes share an IP to tell which kind.
ENDPOINT_DEPENDENT = "endpoint-dependent"
#: Not measured, or too few answers to tell.
UNKNOWN = "unknown"
#: Filtering: strangers' probes did not arrive: address-dependent or address-and-port-dependent.
FILTERING_STRICT = "address-dependent-or-stricter"

#: Every word a mapping verdict may take.
MAPPINGS = (MAPPING_NONE, ENDPOINT_INDEPENDENT, ADDRESS_DEPENDENT, ADDRESS_AND_PORT_DEPENDENT,
            ENDPOINT_DEPENDENT, UNKNOWN)
#: Every word a filtering verdict may take.
FILTERINGS = (ENDPOINT_INDEPENDENT, FILTERING_STRICT, UNKNOWN)
#: Mappings that give another port per destination: the announced port is no use to a peer.
VARYING_MAPPINGS = frozenset({ADDRESS_DEPENDENT, ADDRESS_AND_PORT_DEPENDENT, ENDPOINT_DEPENDENT})


def mapping_of(nat_class: NatClass) -> str:
    """The mapping word for the observer's class. The observer counts one witness per IP, so a
    RANDOM class (another port per witness) cannot tell address-dependent from
    address-and-port-dependent: :data:`ENDPOINT_DEPENDENT` says no more than was seen."""
    if nat_class is NatClass.CONSISTENT:
        return ENDPOINT_INDEPENDENT
    if nat_class is NatClass.RANDOM:
        return ENDPOINT_DEPENDENT
    return UNKNOWN


def filtering_of(reachable: bool | None, failed_checks: int) -> str:
    """The filtering word from the reachability checks: ``reachable`` (True once a stranger's
    datagram got in; None when not measured) and ``failed_checks`` (conclusive checks in a row
    whose probes were sent and did not arrive)."""
    if reachable:
        return ENDPOINT_INDEPENDENT
    if failed_checks > 0:
        return FILTERING_STRICT
    return UNKNOWN
