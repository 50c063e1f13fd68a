"""What the daemon and the short-lived client nodes share: engine parameters from the
config, bootstrap name resolution, how records and events are presented, where the identity
key lives. No life cycle here: ``service.py`` runs the daemon, ``client.py`` client nodes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from dhtnode.daemon.config import Config
from dhtnode.daemon.logging import get_logger
from dhtnode.daemon.state import IDENTITY_FILE
from dhtnode.dht.node import DhtParams
from dhtnode.dht.records import Record
from dhtnode.wire import address as wire_address
from dhtnode.wire.address import Address
from dhtnode.wire.network import network_id

log = get_logger("dhtnode")


def params_from_config(cfg: Config) -> DhtParams:
    return DhtParams(
        k=cfg.dht.k,
        alpha=cfg.dht.alpha,
        request_timeout=cfg.dht.request_timeout,
        slow_after=min(0.25, cfg.dht.request_timeout / 2),
        bucket_refresh=cfg.dht.bucket_refresh,
        record_ttl=cfg.records.ttl,
        max_records=cfg.records.max_total,
        max_records_per_topic=cfg.records.max_per_topic,
        max_records_per_ip=cfg.records.max_per_ip,
        network=network_id(cfg.node.network),
        rpc_trace=cfg.log.level == "debug",
    )


async def resolve(hosts: list[tuple[str, int]] | tuple[tuple[str, int], ...]) -> list[Address]:
    """Resolve names in a bootstrap list; unresolvable entries are logged and skipped. The
    daemon calls this again whenever it rejoins (``Daemon._reresolve``): a name's address
    may have changed since the last time."""
    loop = asyncio.get_running_loop()
    out: list[Address] = []
    for host, port in hosts:
        try:
            infos = await loop.getaddrinfo(host, port, type=2)  # SOCK_DGRAM
        except OSError as exc:
            log.warning("bootstrap_unresolvable", host=host, port=port, error=str(exc))
            continue
        for info in infos:
            addr = wire_address.normalize(info[4])
            if addr not in out:
                out.append(addr)
    return out


def record_to_json(topic: bytes, rec: Record) -> dict[str, Any]:
    return {
        "topic": topic.hex(),
        "public_key": rec.public_key.hex(),
        "seq": rec.seq,
        "addresses": [
            {"kind": kind.name.lower(), "address": wire_address.format_addr(a)}
            for kind, a in rec.addresses
        ],
    }


#: Engine events nobody can act on: debug level (a user asked for --log-level debug).
DEBUG_EVENTS = frozenset({"probe_inconclusive", "quic_connected", "dht_rejoin",
                          # The sampled per-request trace (dht/rpc.py), on at debug only.
                          "rpc_request", "rpc_reply", "rpc_log_suppressed"})


def log_event(name: str, fields: dict[str, Any]) -> None:
    if name in DEBUG_EVENTS:
        log.debug(name, **fields)
    else:
        log.info(name, **fields)


def identity_path(state_dir: Path) -> Path:
    return state_dir / IDENTITY_FILE
