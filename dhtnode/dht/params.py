"""The engine's tunable parameters (``DhtParams``), in a module of their own: the daemon's
configuration takes its defaults from here without importing the engine (CLI start-up time).
``dhtnode.dht.node`` re-exports it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DhtParams:
    k: int = 20
    alpha: int = 3
    #: Seconds before an unanswered request fails.
    request_timeout: float = 1.0
    #: Seconds after which a lookup request stops counting against alpha.
    slow_after: float = 0.25
    #: Retransmissions for single requests (ping, announce); lookups move on instead.
    retries: int = 1
    bucket_refresh: float = 900.0
    record_ttl: float = 1200.0
    max_records: int = 65536
    max_records_per_topic: int = 32
    max_records_per_ip: int = 128
    #: Seconds between reachability re-checks once serving (and back-off cap while a client).
    reachability_recheck: float = 600.0
    #: Longest interval between self-lookups while the routing table has fewer than k nodes
    #: (the first comes after 2 s and the interval doubles up to this).
    rejoin_interval: float = 30.0
    #: Our network's id (``wire.network.network_id``), carried by every DHT message we send;
    #: messages of another network are dropped. None: the public network (no id on the wire).
    network: bytes | None = None
    #: Emit sampled ``rpc_request`` / ``rpc_reply`` events (``dht/rpc.py``): the daemon turns
    #: this on at log level debug.
    rpc_trace: bool = False
