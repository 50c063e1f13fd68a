"""dhtnode: a Kademlia DHT daemon with a STUN reflector and signed topic records.

The names below are the library API (docs/API.md); everything else is internal. They are
imported on first use, so ``import dhtnode`` stays cheap, and importing configures no
logging: the package logs through the standard ``logging`` module (logger "dhtnode") until
a program configures it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from dhtnode.api import Found, Node, load_identity, open_node
    from dhtnode.crypto.identity import Identity
    from dhtnode.daemon.config import Config
    from dhtnode.dht.ids import topic_from_name
    from dhtnode.errors import ConfigError, DhtnodeError
    from dhtnode.transport.connection import Connection
    from dhtnode.transport.connections import Server

#: name -> module it lives in.
_EXPORTS = {
    "open_node": "dhtnode.api",
    "Node": "dhtnode.api",
    "Found": "dhtnode.api",
    "load_identity": "dhtnode.api",
    "Identity": "dhtnode.crypto.identity",
    "Config": "dhtnode.daemon.config",
    "topic_from_name": "dhtnode.dht.ids",
    "Connection": "dhtnode.transport.connections",
    "Server": "dhtnode.transport.connections",
    "DhtnodeError": "dhtnode.errors",
    "ConfigError": "dhtnode.errors",
}

__all__ = [
    "Config", "ConfigError", "Connection", "DhtnodeError", "Found", "Identity", "Node",
    "Server", "__version__", "load_identity", "open_node", "topic_from_name",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dhtnode' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
