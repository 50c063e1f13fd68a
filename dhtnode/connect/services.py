"""Plug the connect services into an engine: the one place that wires them.

Every node introduces for others (``Introducer``) and, while it serves, relays for the pairs
it introduces (``RelayService``); ``Listeners`` answers introductions for the keys this node
listens on. Called by the composition roots (daemon, simulator, tests), so the
engine itself never imports ``dhtnode.connect``.
"""

from __future__ import annotations

from dataclasses import dataclass

from dhtnode.connect.intro import Introducer
from dhtnode.connect.listen import Listeners
from dhtnode.connect.relay import RelayService
from dhtnode.dht.node import DhtNode
from dhtnode.nat.relay import RelayLimits


@dataclass(frozen=True, slots=True)
class ConnectServices:
    introducer: Introducer
    listeners: Listeners
    relay: RelayService


def plug_in(
    node: DhtNode, *, relay: bool = True, relay_limits: RelayLimits | None = None
) -> ConnectServices:
    """``relay``: offer blind relaying to the pairs we introduce (only while we serve)."""
    relay_service = RelayService(node.ctx, relay_limits or RelayLimits(), enabled=relay)
    introducer = Introducer(node.ctx, node.rpc, node.storage, relay_service)
    listeners = Listeners(node.ctx, node.rpc, node.topics)
    node.register(relay_service)
    node.register(introducer)
    node.register(listeners)
    return ConnectServices(introducer, listeners, relay_service)
