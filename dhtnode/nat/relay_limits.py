"""The blind relay's limits (``RelayLimits``, config ``[relay]``), in a module of their own so
the configuration does not import the relay table (CLI start-up time). ``dhtnode.nat.relay``
re-exports it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RelayLimits:
    #: Sessions at once in all.
    max_sessions: int = 256
    #: Sessions at once with one member IP: a carrier NAT puts many users behind one IP, and
    #: every introduction creates a session that lives until it idles out (30 s).
    max_sessions_per_ip: int = 64
    #: Bytes per second one session may forward (both directions together).
    session_rate: float = 1_000_000.0
    #: Bytes per second the relay forwards in all.
    total_rate: float = 10_000_000.0
    #: Seconds a session may live, whatever its traffic.
    max_duration: float = 3600.0
