"""The client side of an introduction: find a listener by key, introduce ourselves, read its
answer. Sans-I/O: an :class:`Op` over the engine's lookup and RPC.

Steps: look up ``listen_topic(key)``; take the record signed by that key (others may store
records under the same topic; only the key's own counts); send one sealed hello as INTRODUCE
to every introducer the record names that handed us a write token during the lookup (the
listener answers retransmissions and copies with the same reply, so the first answer wins);
open the reply. Results: :class:`Introduced`, or an error naming the cause: the key is not
announced (:class:`PeerNotFound`, within one lookup: a few seconds at most), the listener
refused us (:class:`ConnectRefused`), or no introducer answered (:class:`IntroductionFailed`).

Must not punch or open sockets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dhtnode.connect.handshake import ClientHandshake, HandshakeError, seal_hello
from dhtnode.connect.listen import REFUSED_BUSY
from dhtnode.connect.peerinfo import PeerInfo, PeerInfoError
from dhtnode.connect.relay import RelayOffer, decode_offer
from dhtnode.crypto.identity import Identity
from dhtnode.dht.ids import listen_topic
from dhtnode.dht.node import DhtNode
from dhtnode.dht.op import NoAnswer, Op, OperationError
from dhtnode.dht.records import AddressKind
from dhtnode.dht.topics import LookupResult
from dhtnode.errors import DecodeError
from dhtnode.wire import address as wire_address
from dhtnode.wire import messages as m
from dhtnode.wire.address import Address

#: Retransmissions of an INTRODUCE (the request timeout is the node's, 1 s by default).
INTRODUCE_RETRIES = 2
#: Seconds between trying one introducer and the next while no answer came: the first
#: usually answers within a round trip, and each copy costs the listener a hello to check.
INTRODUCER_STAGGER = 0.3


class PeerNotFound(OperationError):
    """Nobody announced the key (or its record expired)."""

    code = "peer_not_found"


class ConnectRefused(OperationError):
    """The listener refused our key."""

    code = "refused"


class IntroductionFailed(OperationError):
    """The key is announced, but no introducer passed our hello on and back."""

    code = "introduction_failed"


@dataclass(frozen=True, slots=True)
class Introduced:
    server_key: bytes
    handshake: ClientHandshake
    #: The listener's address as the introducer saw it: where we punch.
    server_address: Address
    server_info: PeerInfo
    introducer: Address
    #: The introducer's relay session for this pair, if it offered one.
    relay: RelayOffer | None = None


def introduce(
    node: DhtNode,
    identity: Identity,
    server_key: bytes,
    my_info: PeerInfo,
    *,
    exclude: frozenset[Address] = frozenset(),
) -> Op[Introduced]:
    """Introduce ``identity`` to the listener of ``server_key``, through any introducer the
    record names but those in ``exclude`` (a relayed connection whose relay died asks
    another introducer for its relay)."""
    topic = listen_topic(server_key)
    op: Op[Introduced] = Op()
    key_hex = server_key.hex()

    def found(o: Op[LookupResult]) -> None:
        if o.error is not None:
            op.set_error(o.error)
            return
        res = o.result()
        if res.responses == 0:
            op.set_error(NoAnswer("no DHT node answered; is a bootstrap reachable?"))
            return
        rec = next((r for r in res.records if r.public_key == server_key), None)
        if rec is None:
            op.set_error(PeerNotFound(f"no node announces key {key_hex} (is it listening?)"))
            return
        introducers = [a for kind, a in rec.addresses if kind is AddressKind.INTRODUCER]
        usable = [a for a in introducers if a in res.tokens and a not in exclude]
        if not usable:
            skipped = sum(a in exclude for a in introducers)
            op.set_error(IntroductionFailed(
                f"key {key_hex} is announced, but none of its {len(introducers)} introducers "
                "answered our lookup"
                + (f" ({skipped} excluded: tried already)" if skipped else "")
            ))
            return
        hello, hs = seal_hello(identity, server_key, my_info.encode(), wall=node.ctx.wall())
        sent: set[Address] = set()
        answers = 0
        errors: list[str] = []

        def answered(via: Address, resp: m.Response | None) -> None:
            nonlocal answers
            answers += 1
            if op.done:
                return
            if resp is None or resp.error is not None:
                # Try the next introducer now rather than after its stagger.
                nxt = usable.index(via) + 1
                if nxt < len(usable):
                    send(usable[nxt])
            if resp is None:
                errors.append(f"{wire_address.format_addr(via)}: no answer")
            elif resp.error is not None or resp.value is None:
                errors.append(f"{wire_address.format_addr(via)}: error {resp.error}")
            else:
                try:
                    server_addr, pos = wire_address.decode(resp.value)
                    relay, pos = decode_offer(resp.value, pos, via)
                    reply = hs.open_reply(resp.value[pos:])
                except (HandshakeError, DecodeError) as exc:
                    node.stats["drop_bad_reply"] += 1
                    errors.append(f"{wire_address.format_addr(via)}: {exc}")
                else:
                    if not reply.accepted:
                        why = ("has as many connections as it takes from us (or in all); "
                               "close one or try again later" if reply.reason == REFUSED_BUSY
                               else "refused our key")
                        op.set_error(ConnectRefused(f"the listener of {key_hex} {why}"))
                        return
                    try:
                        info = PeerInfo.decode(reply.payload)
                    except PeerInfoError as exc:
                        errors.append(f"bad reply payload: {exc}")
                    else:
                        op.set_result(
                            Introduced(server_key, hs, server_addr, info, via, relay)
                        )
                        return
            if answers == len(usable):
                op.set_error(IntroductionFailed(
                    f"no introducer of {key_hex} passed our hello on: " + "; ".join(errors)
                ))

        def send(via: Address) -> None:
            if op.done or via in sent:
                return
            sent.add(via)
            node.rpc.request(
                via,
                m.Command.INTRODUCE,
                lambda r: answered(via, r),
                target=topic,
                token=res.tokens[via],
                value=hello,
                retries=INTRODUCE_RETRIES,
                user_op=True,
            )

        def later(via: Address) -> Callable[[], None]:
            return lambda: send(via)

        send(usable[0])
        for i, via in enumerate(usable[1:], 1):
            node.ctx.call_later(i * INTRODUCER_STAGGER, later(via))

    node.lookup(topic).add_done_callback(found)
    return op
