"""The introducer: passes a sealed hello from a client to the listener that announced through
us, and the sealed reply back.

Owns INTRODUCE (client -> us). The client must hold a write token for its source address (it
got one from our LOOKUP answer), so a forged source address cannot make us, or the listener,
send anything toward a third party. We forward as INTRO_FORWARD to the address the listener's
record was written from, adding the client's address as we saw it and echoing the listener's
token (our proof of address; without one it answers error 2 with a token, and we retry once
with it); the listener's answer goes
back with the listener's address as we saw it; while we serve, both also get a relay
session of ours (``connect/relay.py``) with a token bound to their address. We cannot read,
forge or replay what we carry (``connect/handshake.py``). Bounded: INTRODUCEs per source IP
per window, forwards in flight.

Must not punch, connect, or look inside the hello.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Mapping

from dhtnode.connect.relay import RelayService, encode_offer
from dhtnode.dht.context import NodeContext
from dhtnode.dht.ids import listen_topic
from dhtnode.dht.node import Service
from dhtnode.dht.rpc import Handler, Rpc
from dhtnode.dht.storage import Storage
from dhtnode.wire import address as wire_address
from dhtnode.wire import messages as m
from dhtnode.wire.address import Address

#: INTRODUCE requests accepted from one source IP per window (about 13/s): room for a busy
#: client, or several behind one NAT, connecting one after another; a flood gets BUSY, so one
#: address cannot make us hand a listener more than this many hellos to open.
MAX_INTRODUCE_PER_IP = 64
#: Seconds of one rate window.
INTRODUCE_WINDOW = 5.0
#: Forwards waiting for a listener's answer, at most (each holds one request slot).
MAX_FORWARDS_IN_FLIGHT = 256
#: Seconds to wait for the listener's reply (it answers at once; one retransmission).
FORWARD_TIMEOUT = 1.0


class Introducer(Service):
    def __init__(
        self, ctx: NodeContext, rpc: Rpc, storage: Storage, relay: RelayService | None = None
    ) -> None:
        self._ctx = ctx
        self._rpc = rpc
        self._storage = storage
        self._relay = relay
        self._per_ip: Counter[str] = Counter()
        self._in_flight = 0
        ctx.call_later(INTRODUCE_WINDOW, self._new_window)

    def handlers(self) -> Mapping[m.Command, Handler]:
        return {m.Command.INTRODUCE: self._on_introduce}

    def _new_window(self) -> None:
        self._per_ip.clear()
        if not self._ctx.standing.closed:
            self._ctx.call_later(INTRODUCE_WINDOW, self._new_window)

    def _listener_of(self, topic: bytes) -> Address | None:
        """Where the listener whose key hashes to ``topic`` announced from. Anyone may store
        a record under any topic; only the key the topic is derived from is the listener."""
        for rec in self._storage.store.get(topic, self._ctx.now):
            if listen_topic(rec.public_key) == topic:
                return self._storage.announced_from(topic, rec.public_key)
        return None

    def _on_introduce(self, req: m.Request, source: Address) -> None:
        ctx = self._ctx
        respond = self._rpc.respond
        if req.target is None or req.value is None or req.token is None:
            respond(req, source, error=m.ErrorCode.MISSING_FIELD)
            return
        self._per_ip[source[0]] += 1
        if self._per_ip[source[0]] > MAX_INTRODUCE_PER_IP:
            ctx.stats["drop_introduce_rate"] += 1
            respond(req, source, error=m.ErrorCode.BUSY)
            return
        # The token proves the client owns its source address: cheap, and before anything else
        # makes us send a byte to the listener.
        if not self._storage.tokens.check(req.token, source, ctx.now):
            ctx.stats["drop_bad_token"] += 1
            respond(req, source, error=m.ErrorCode.BAD_TOKEN)
            return
        listener = self._listener_of(req.target)
        if listener is None:
            ctx.stats["introduce_not_found"] += 1
            respond(req, source, error=m.ErrorCode.NOT_FOUND)
            return
        if self._in_flight >= MAX_FORWARDS_IN_FLIGHT:
            ctx.stats["drop_introduce_busy"] += 1
            respond(req, source, error=m.ErrorCode.BUSY)
            return
        self._in_flight += 1
        ctx.stats["introduce_forwarded"] += 1
        # While we serve we also offer to relay this pair: each side gets a token bound to
        # the address we see it at, so nobody else can use the session.
        offer = self._relay.offer(source, listener) if self._relay is not None else None
        client_block = encode_offer(offer[0], offer[1]) if offer else encode_offer(None, None)
        listener_block = encode_offer(offer[0], offer[2]) if offer else encode_offer(None, None)

        def forward(first: bool) -> None:
            self._rpc.request(
                listener,
                m.Command.INTRO_FORWARD,
                functools.partial(answered, first),
                target=req.target,
                value=body,
                retries=1,
                timeout=FORWARD_TIMEOUT,
                user_op=True,
            )

        def answered(first: bool, resp: m.Response | None) -> None:
            if (
                first
                and resp is not None
                and resp.error == m.ErrorCode.BAD_TOKEN
                and resp.token is not None
            ):
                # The listener wants proof of our address; the retry echoes the token its
                # answer carried (Rpc keeps it for later forwards too).
                ctx.stats["introduce_forward_retry"] += 1
                forward(False)
                return
            self._in_flight -= 1
            if resp is None or resp.error is not None or resp.value is None:
                ctx.stats["introduce_unanswered"] += 1
                respond(req, source, error=m.ErrorCode.NOT_FOUND)
                return
            # The listener's address as we see it: where the client is to punch.
            respond(req, source, value=wire_address.encode(listener) + client_block + resp.value)

        body = wire_address.encode(source) + listener_block + req.value
        forward(True)
