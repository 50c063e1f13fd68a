"""Listening on a key: be findable by public key and answer sealed introductions.

A listener announces a record under ``listen_topic(public_key)``, signed with the key it
serves; the record names up to three storers as its introducers. It keeps its NAT mappings
towards them alive (a PING every :data:`KEEPALIVE_INTERVAL`: Linux forgets an idle UDP
mapping after 30 s), and announces again when one stops answering or our address changes.

Owns INTRO_FORWARD (introducer -> us): only from a node that stored our record and proved its
address with our token (else error 2 with a token, and the introducer retries); opens
the hello (``handshake.py``), refuses keys the allow-list or callback rejects (the client gets
"refused", sealed, not a timeout), answers a retransmitted hello with the same reply and no new
attempt, and hands every accepted introduction to ``on_intro`` (the asyncio layer punches).

Must not punch or open sockets.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from dhtnode.connect.handshake import HandshakeError, ReplayGuard, ServerHandshake, open_hello
from dhtnode.connect.peerinfo import PeerInfo, PeerInfoError
from dhtnode.connect.relay import RelayOffer, decode_offer
from dhtnode.crypto import tokens
from dhtnode.crypto.identity import Identity
from dhtnode.dht.context import NodeContext
from dhtnode.dht.ids import listen_topic
from dhtnode.dht.node import Service
from dhtnode.dht.op import Op
from dhtnode.dht.rpc import Handler, Rpc
from dhtnode.dht.timers import Timer
from dhtnode.dht.topics import Topics
from dhtnode.errors import DecodeError
from dhtnode.nat.observer import NatClass
from dhtnode.wire import address as wire_address
from dhtnode.wire import messages as m
from dhtnode.wire.address import Address

#: Seconds between keep-alive PINGs to each introducer (Linux UDP conntrack: 30 s unreplied,
#: 120 s once answered; home routers as low as 30 s).
KEEPALIVE_INTERVAL = 20.0
#: Seconds between two re-announcements caused by lost introducers or an address change.
MIN_REANNOUNCE_GAP = 5.0
#: Reason code in a refused reply: the key is not allowed.
REFUSED_NOT_ALLOWED = 1
#: Reason code in a refused reply: the listener holds as many connections as it takes from
#: this key, this address or in all (the driver's limits, :attr:`Listeners.admit`).
REFUSED_BUSY = 2
#: Keys a node listens on at once.
MAX_LISTENERS = 64


@dataclass(frozen=True, slots=True)
class Introduction:
    """An accepted introduction, as the listener sees it."""

    listener: Listening
    handshake: ServerHandshake
    #: The client's address as the introducer saw it: the only address we punch toward
    #: (besides LAN addresses when both sides share a public IP).
    client_address: Address
    client_info: PeerInfo
    #: The introducer's relay session for this pair, if it offered one.
    relay: RelayOffer | None = None


@dataclass(slots=True)
class Listening:
    identity: Identity
    topic: bytes
    #: May this client key connect? None: anyone.
    allow: Callable[[bytes], bool] | None
    on_intro: Callable[[Introduction], None]
    guard: ReplayGuard = field(default_factory=ReplayGuard)
    introducers: list[Address] = field(default_factory=list)
    timer: Timer | None = None
    last_announce: float = -1e18
    closed: bool = False

    @property
    def public_key(self) -> bytes:
        return self.identity.public_key


class Listeners(Service):
    def __init__(self, ctx: NodeContext, rpc: Rpc, topics: Topics) -> None:
        self._ctx = ctx
        self._rpc = rpc
        self._topics = topics
        self._by_topic: dict[bytes, Listening] = {}
        #: Our LAN addresses (the driver fills them in: it knows the interfaces and port).
        self.lan_addresses: tuple[Address, ...] = ()
        #: This host's own IPv6 addresses with the node's port (the driver fills them in),
        #: told to peers when the DHT has shown us no IPv6 address of ours: IPv6 has no NAT,
        #: so a peer with IPv6 can race it beside an IPv4 punch (``nat/candidates.py``).
        self.own_v6: tuple[Address, ...] = ()
        #: The driver's connection limits: called with an allowed client's key and the
        #: address the introducer saw; False refuses the hello (:data:`REFUSED_BUSY`) before
        #: anything is punched. None: no limits (a bare engine).
        self.admit: Callable[[bytes, Address], bool] | None = None
        #: Mapped ports the driver sampled from a fresh socket after the DHT's samples went
        #: stale (a sequential NAT moves on with every new flow): see :meth:`set_fresh_samples`.
        self.fresh_port_samples: tuple[int, ...] = ()
        self._fresh_base: frozenset[int] = frozenset()
        topics.on_announced = self._announced

    def handlers(self) -> Mapping[m.Command, Handler]:
        return {m.Command.INTRO_FORWARD: self._on_intro_forward}

    def status(self) -> dict[str, object]:
        return {"listening": [lst.public_key.hex() for lst in self._by_topic.values()]}

    def my_info(self) -> PeerInfo:
        """What we tell a peer about reaching us."""
        ctx = self._ctx
        st = ctx.standing
        nat = ctx.observer.nat_class
        public = ctx.observer.public_addresses or ((st.public,) if st.public else ())
        if not any(":" in a[0] for a in public):
            public = tuple(public) + self.own_v6
        return PeerInfo(
            nat_class=nat.value if st.fixed_public is None else NatClass.CONSISTENT.value,
            open=st.reachable,
            port_samples=self._port_samples(),
            public_addresses=tuple(public)[:4],
            lan_addresses=self.lan_addresses[:4],
        )

    def set_fresh_samples(self, ports: tuple[int, ...]) -> None:
        """Mapped ports just sampled from a new socket, in the order the NAT allocated them.
        They stand for our NAT's position until the DHT shows a port they do not know."""
        self.fresh_port_samples = ports[-16:]
        self._fresh_base = frozenset(self._ctx.observer.port_samples)

    def _port_samples(self) -> tuple[int, ...]:
        seen = self._ctx.observer.port_samples
        if self.fresh_port_samples and self._fresh_base.issuperset(seen):
            # Newer than every DHT sample: mixing in the old ones could only hide where the
            # NAT is now (a wrapped sequential pool sorts the old samples last).
            return self.fresh_port_samples
        return seen[-16:]

    def listen(
        self,
        identity: Identity,
        on_intro: Callable[[Introduction], None],
        *,
        allow: Callable[[bytes], bool] | None = None,
    ) -> tuple[Listening, Op[int]]:
        """Start listening on ``identity``'s key; the Op is the first announcement (how many
        nodes stored the record)."""
        topic = listen_topic(identity.public_key)
        if topic in self._by_topic:
            raise ValueError(f"already listening on {identity.public_key.hex()}")
        if len(self._by_topic) >= MAX_LISTENERS:
            raise ValueError(f"listening on {MAX_LISTENERS} keys already")
        lst = Listening(identity, topic, allow, on_intro)
        self._by_topic[topic] = lst
        op = self._announce(lst)
        lst.timer = self._ctx.call_later(KEEPALIVE_INTERVAL, lambda: self._keepalive(lst))
        return lst, op

    def unlisten(self, lst: Listening) -> Op[int]:
        lst.closed = True
        if lst.timer is not None:
            lst.timer.cancel()
        self._by_topic.pop(lst.topic, None)
        return self._topics.unannounce(lst.topic, identity=lst.identity)

    def standing_changed(self) -> None:
        # Our record carries our public addresses: announce again when they change.
        for lst in list(self._by_topic.values()):
            self._maybe_reannounce(lst)

    def _announce(self, lst: Listening) -> Op[int]:
        lst.last_announce = self._ctx.now
        return self._topics.announce(lst.topic, identity=lst.identity)

    def _maybe_reannounce(self, lst: Listening) -> None:
        if lst.closed or self._ctx.now - lst.last_announce < MIN_REANNOUNCE_GAP:
            return
        self._ctx.emit("listener_reannounce", public_key=lst.public_key.hex())
        self._announce(lst)

    def _announced(self, topic: bytes, introducers: list[Address]) -> None:
        lst = self._by_topic.get(topic)
        if lst is not None:
            lst.introducers = introducers

    def _keepalive(self, lst: Listening) -> None:
        if lst.closed or self._ctx.standing.closed:
            return

        def answered(resp: m.Response | None) -> None:
            if resp is None:
                self._maybe_reannounce(lst)  # an introducer left: name others

        for addr in lst.introducers:
            self._rpc.request(addr, m.Command.PING, answered, user_op=True)
        if not lst.introducers:
            self._maybe_reannounce(lst)
        lst.timer = self._ctx.call_later(KEEPALIVE_INTERVAL, lambda: self._keepalive(lst))

    def _on_intro_forward(self, req: m.Request, source: Address) -> None:
        ctx = self._ctx
        lst = self._by_topic.get(req.target or b"")
        if lst is None or req.value is None:
            ctx.stats["drop_intro_unknown"] += 1
            self._rpc.respond(req, source, error=m.ErrorCode.NOT_FOUND)
            return
        # Only a node that stored our record may hand us introductions (an address we merely
        # sent to could be planted with a forged request), and only once it proved its address
        # with our token: whoever read our record could otherwise forge its INTRO_FORWARD and
        # aim our punch at a victim. Its retry echoes the token this error carries.
        if source not in self._topics.storers(lst.topic):
            ctx.stats["drop_intro_stranger"] += 1
            return
        if self._rpc.proof(req, source) == tokens.INVALID:
            ctx.stats["drop_intro_unproven"] += 1
            self._rpc.respond(req, source, error=m.ErrorCode.BAD_TOKEN)
            return
        try:
            client_addr, pos = wire_address.decode(req.value)
            relay, pos = decode_offer(req.value, pos, source)
            hs = open_hello(lst.identity, req.value[pos:], wall=ctx.wall(), guard=lst.guard)
            info = PeerInfo.decode(hs.payload)
        except HandshakeError as exc:
            ctx.stats[f"drop_hello_{exc.kind}"] += 1
            self._rpc.respond(req, source, error=m.ErrorCode.BAD_RECORD)
            return
        except (DecodeError, PeerInfoError):
            ctx.stats["drop_hello_malformed"] += 1
            self._rpc.respond(req, source, error=m.ErrorCode.BAD_RECORD)
            return
        if hs.duplicate:
            # A retransmission (the same hello, maybe through another introducer): the same
            # answer, and no second attempt.
            ctx.stats["hello_duplicate"] += 1
            if hs.previous_reply is not None:
                self._rpc.respond(req, source, value=hs.previous_reply)
            return
        if lst.allow is not None and not lst.allow(hs.client_key):
            ctx.stats["hello_refused"] += 1
            ctx.emit("connection_refused", client_key=hs.client_key.hex())
            reply = hs.seal_reply(accepted=False, payload=b"", reason=REFUSED_NOT_ALLOWED)
            self._rpc.respond(req, source, value=reply)
            return
        if self.admit is not None and not self.admit(hs.client_key, client_addr):
            ctx.stats["hello_busy"] += 1
            ctx.emit("connection_refused", client_key=hs.client_key.hex(), reason="busy")
            reply = hs.seal_reply(accepted=False, payload=b"", reason=REFUSED_BUSY)
            self._rpc.respond(req, source, value=reply)
            return
        ctx.stats["hello_accepted"] += 1
        reply = hs.seal_reply(accepted=True, payload=self.my_info().encode())
        self._rpc.respond(req, source, value=reply)
        lst.on_intro(Introduction(lst, hs, client_addr, info, relay))
