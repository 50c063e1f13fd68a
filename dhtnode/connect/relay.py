"""The relay service on the engine: blind relaying for others, and the members' side of the
relay datagrams routed to whoever is connecting through a relay.

Owns the first-byte range 0x30-0x3F on the node socket. BIND and DATA-to-relay go to the
:class:`~dhtnode.nat.relay.RelayTable` (only while we serve and relaying is on); BOUND and
DATA-from-relay go to ``member_sink`` (the connection layer, which holds relayed paths).
Introducers mint session tokens through :meth:`RelayService.offer`.

Must not punch or open sockets; forwarding goes through the engine's one send path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from dhtnode.dht.context import NodeContext
from dhtnode.dht.node import Receiver, Service
from dhtnode.nat.relay import RelayLimits, RelayTable
from dhtnode.wire import relay as wire
from dhtnode.wire.address import Address
from dhtnode.wire.demux import Kind

#: Seconds between sweeps of expired relay sessions.
TICK = 5.0


@dataclass(frozen=True, slots=True)
class RelayOffer:
    """What an introduction tells one side about the relay to use: the relay's address (the
    introducer's, as that side reaches it), the session and that side's token."""

    relay: Address
    session: bytes
    token: bytes


#: Bytes of a relay offer block with an offer: flag, session id, token.
OFFER_LEN = 1 + wire.SESSION_ID_LEN + wire.TOKEN_LEN


def encode_offer(session: bytes | None, token: bytes | None) -> bytes:
    """``u8 1 | 8 session | 16 token``, or ``u8 0`` when the introducer does not relay."""
    if session is None or token is None:
        return b"\x00"
    return b"\x01" + session + token


def decode_offer(data: bytes, pos: int, relay: Address) -> tuple[RelayOffer | None, int]:
    """The offer block at ``pos``; returns it (or None) and the position after it."""
    if pos >= len(data) or data[pos] not in (0, 1):
        raise wire.RelayDecodeError("relay offer flag missing or not 0/1")
    if data[pos] == 0:
        return None, pos + 1
    end = pos + OFFER_LEN
    if end > len(data):
        raise wire.RelayDecodeError("relay offer truncated")
    session = data[pos + 1 : pos + 1 + wire.SESSION_ID_LEN]
    return RelayOffer(relay, session, data[pos + 1 + wire.SESSION_ID_LEN : end]), end


class RelayService(Service):
    def __init__(self, ctx: NodeContext, limits: RelayLimits, *, enabled: bool = True) -> None:
        self._ctx = ctx
        self.enabled = enabled
        self.table = RelayTable(limits, ctx.secret_bytes, ctx.now)
        #: BOUND and DATA-from-relay datagrams, for the connection layer: (data, source).
        self.member_sink: Callable[[bytes, Address], None] | None = None
        ctx.call_later(TICK, self._tick)

    @property
    def offering(self) -> bool:
        """We relay only while serving: a public, proven-reachable address."""
        return self.enabled and self._ctx.standing.server

    def receivers(self) -> Mapping[Kind, Receiver]:
        return {Kind.RELAY: self._on_datagram}

    def status(self) -> dict[str, Any]:
        return {"relay": {"enabled": self.offering, **self.table.status()}}

    def offer(self, client: Address, listener: Address) -> tuple[bytes, bytes, bytes] | None:
        """A fresh session for an introduction: (session id, client token, listener token),
        or None when we do not relay."""
        if not self.offering:
            return None
        now = self._ctx.now
        session = self.table.new_session_id()
        return (
            session,
            self.table.mint(session, wire.ROLE_CLIENT, client, now),
            self.table.mint(session, wire.ROLE_SERVER, listener, now),
        )

    def _on_datagram(self, data: bytes, source: Address) -> None:
        ctx = self._ctx
        if data[0] in (wire.RelayType.BIND, wire.RelayType.DATA_TO_RELAY):
            if not self.offering:
                ctx.stats["drop_relay_off"] += 1
                return
            for out, dest in self.table.receive(data, source, ctx.now):
                ctx.send(out, dest)
            return
        if self.member_sink is not None:
            self.member_sink(data, source)
        else:
            ctx.stats["drop_relay_no_member"] += 1

    def _tick(self) -> None:
        self.table.tick(self._ctx.now)
        for k, v in self.table.stats.items():
            self._ctx.stats[k] = v
        if not self._ctx.standing.closed:
            self._ctx.call_later(TICK, self._tick)
