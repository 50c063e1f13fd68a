"""Plug the connect services into an engine: the one place that wires them.

Every node introduces for others (``Introducer``); ``Listeners`` answers introductions for the
keys this node listens on. Called by the composition roots (daemon, simulator, tests), so the
engine itself never imports ``dhtnode.connect``.
"""

from __future__ import annotations

from dataclasses import dataclass

from dhtnode.connect.intro import Introducer
from dhtnode.connect.listen import Listeners
from dhtnode.dht.node import DhtNode


@dataclass(frozen=True, slots=True)
class ConnectServices:
    introducer: Introducer
    listeners: Listeners


def plug_in(node: DhtNode) -> ConnectServices:
    introducer = Introducer(node.ctx, node.rpc, node.storage)
    listeners = Listeners(node.ctx, node.rpc, node.topics)
    node.register(introducer)
    node.register(listeners)
    return ConnectServices(introducer, listeners)
