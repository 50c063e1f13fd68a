"""The punch driver, in asyncio: carries out sans-I/O punch plans on the node's sockets.

A :class:`PunchDriver` runs the :class:`~dhtnode.nat.punch.PunchPlan` of every attempt (one
per introduction): it sends the plan's probes and ACKs from the node socket (through the
engine's one send path, ``NodeContext.send``, so the sent-to memory sees them) or from the
extra sockets a birthday search needs (leased from the one bounded ``SocketPool``), routes
punch datagrams back to their attempt by attempt id, fires the plan's timers, and resolves
the attempt's ``result``. It owns the attempts table, the limits per peer IP and in all, the
port-search budget per peer IP, and the QUIC paths over the node socket and over a winning
extra socket kept out of its lease (``path_for``, ``close_with``).

Bounded: attempts per peer IP and in all, sockets through the pool, port searches toward one
IP per window; no global throttle, so connects one after another and several at once to one
server all proceed.

Must not decide strategy, timing or crypto (``nat/punch.py`` does), speak QUIC (the bridge
does), introduce, or choose between the punched path and a relay (``connections.py`` does:
an attempt only carries the relayed path offered with it, so an unused one closes with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from dhtnode.connect.peerinfo import PeerInfo
from dhtnode.nat.observer import NatClass
from dhtnode.nat.punch import Punched, PunchFailed, PunchPlan
from dhtnode.nat.strategy import NatProfile
from dhtnode.transport.quic import PeerConnection, QuicBridge
from dhtnode.transport.relaypath import RelayPath
from dhtnode.transport.sockets import KeptSocket, Lease, SocketPool
from dhtnode.transport.udp import NodeEndpoint
from dhtnode.wire import punch as wire_punch
from dhtnode.wire.address import Address
from dhtnode.wire.demux import Kind, classify

#: Punch attempts at once with one peer IP (a client retrying, several processes behind one
#: NAT); more are refused, not queued: each attempt may probe up to 2,048 times.
MAX_ATTEMPTS_PER_IP = 8
#: Punch attempts at once in all (lingering finished ones included: they still route).
MAX_ATTEMPTS = 256
#: Seconds an attempt stays routable after its result, for the trailing ACKs both sides send.
ATTEMPT_LINGER = 2.0
#: Punch plans that may send more than this many probes search a peer's ports (birthday,
#: prediction). Those toward one IP are budgeted: an introducer that lies about a client's
#: address could otherwise aim thousands of probes at a victim. Above the budget the attempt
#: does not punch, and the connection goes over the relay.
SEARCH_SENDS = 100
#: Port searches toward one IP per :data:`SEARCH_WINDOW` (2,048 probes of 31 bytes each: at
#: most ~4 KB/s at a victim, while a client retrying a few times still gets direct paths).
SEARCHES_PER_IP = 4
SEARCH_WINDOW = 60.0


def profile_of(info: PeerInfo) -> NatProfile:
    """The NAT profile a punch plan needs, from a peer's (or our own) introduction info."""
    return NatProfile(NatClass(info.nat_class), info.open, info.port_samples[-16:])


class NodePath:
    """The node's own socket as a QUIC path: sends go through the engine's send path."""

    def __init__(self, endpoint: NodeEndpoint) -> None:
        self._endpoint = endpoint

    def send(self, data: bytes, addr: Address) -> None:
        self._endpoint.send(data, addr)


class KeptPath:
    def __init__(self, kept: KeptSocket) -> None:
        self.kept = kept

    def send(self, data: bytes, addr: Address) -> None:
        self.kept.send(data, addr)


@dataclass(eq=False)
class Attempt:
    plan: PunchPlan
    peer_ip: str
    result: asyncio.Future[Punched | PunchFailed]
    lease: Lease | None = None
    kept: dict[int, KeptPath] = field(default_factory=dict)
    timer: asyncio.TimerHandle | None = None
    timer_at: float | None = None
    ended: bool = False
    #: Still counted against its peer IP's limit (until it has a result).
    counted: bool = True
    #: The relayed path of this attempt, until a connection takes it over (or it is closed).
    relay: RelayPath | None = None


class PunchDriver:
    """Every punch attempt of one node. ``on_start`` is called when an attempt starts (its
    probes and extra sockets are new flows), ``on_result`` when one has its result."""

    def __init__(
        self,
        endpoint: NodeEndpoint,
        bridge: QuicBridge,
        pool: SocketPool,
        stats: Counter[str],
        *,
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        on_start: Callable[[], None],
        on_result: Callable[[], None],
    ) -> None:
        self.endpoint = endpoint
        self.bridge = bridge
        self.pool = pool
        self.stats = stats
        self._spawn = spawn
        self._on_start = on_start
        self._on_result = on_result
        self.node_path = NodePath(endpoint)
        self.attempts: dict[bytes, Attempt] = {}
        self._per_ip: Counter[str] = Counter()
        self._rng = random.Random()
        #: Recent port searches by peer IP (see :data:`SEARCHES_PER_IP`).
        self._searches: dict[str, list[float]] = {}

    def datagram(self, slot: int, data: bytes, source: Address) -> None:
        """A punch datagram on socket ``slot`` (0: the node's): to its attempt, by id."""
        try:
            aid = wire_punch.attempt_id_of(data)
        except wire_punch.PunchDecodeError:
            self.stats["drop_punch_malformed"] += 1
            return
        att = self.attempts.get(aid)
        if att is None:
            self.stats["drop_punch_unknown"] += 1
            return
        att.plan.datagram_received(slot, data, source, time.monotonic())
        self._pump(att)

    def start(
        self,
        *,
        initiator: bool,
        ours: PeerInfo,
        theirs: PeerInfo,
        peer: tuple[Address, ...],
        attempt_id: bytes,
        punch_key: bytes,
        extra: tuple[Address, ...] = (),
    ) -> Attempt | None:
        """Start punching toward ``peer`` (and race the claimed ``extra`` addresses, see
        ``nat/candidates.py``); None when over the limits (or a duplicate)."""
        ip = peer[-1][0]
        if (
            self._per_ip[ip] >= MAX_ATTEMPTS_PER_IP
            or len(self.attempts) >= MAX_ATTEMPTS
            or attempt_id in self.attempts
        ):
            return None
        plan = PunchPlan(
            initiator=initiator,
            ours=profile_of(ours),
            theirs=profile_of(theirs),
            peer=peer,
            attempt_id=attempt_id,
            punch_key=punch_key,
            now=time.monotonic(),
            rng=self._rng,
            extra=extra,
        )
        if plan.send_cap > SEARCH_SENDS and not self.search_allowed(ip):
            plan.cancel()
            plan.result = PunchFailed(
                f"too many port searches toward {ip} in the last {SEARCH_WINDOW:g} s"
            )
            self.stats["punch_search_throttled"] += 1
        loop = asyncio.get_running_loop()
        att = Attempt(plan, ip, loop.create_future())
        self.attempts[attempt_id] = att
        self._per_ip[ip] += 1
        self.stats["punch_attempts"] += 1
        self._on_start()
        wanted = plan.sockets_wanted()
        if wanted:
            self._spawn(self._open_sockets(att, wanted))
        self._pump(att)
        return att

    def search_allowed(self, ip: str) -> bool:
        """Whether a port search toward ``ip`` fits its budget (and count it if so)."""
        now = time.monotonic()
        recent = [t for t in self._searches.get(ip, ()) if now - t < SEARCH_WINDOW]
        if len(recent) >= SEARCHES_PER_IP:
            self._searches[ip] = recent
            return False
        recent.append(now)
        self._searches[ip] = recent
        if len(self._searches) > MAX_ATTEMPTS * 4:  # bounded: forget the quietest IPs
            for old in [k for k, v in self._searches.items() if now - v[-1] >= SEARCH_WINDOW]:
                del self._searches[old]
        return True

    async def _open_sockets(self, att: Attempt, n: int) -> None:
        def on_datagram(slot: int, data: bytes, source: Address) -> None:
            self._slot_datagram(att, slot, data, source)

        try:
            lease = await self.pool.acquire(n, on_datagram, min_n=1)
        except Exception:
            att.plan.sockets_opened(0, time.monotonic())
            self._pump(att)
            return
        if att.ended or att.plan.result is not None:
            lease.close()  # finished meanwhile: nothing more to spray
            return
        att.lease = lease
        att.plan.sockets_opened(len(lease.slots), time.monotonic())
        self._pump(att)

    def _slot_datagram(self, att: Attempt, slot: int, data: bytes, source: Address) -> None:
        kind = classify(data)
        if kind is Kind.PUNCH:
            att.plan.datagram_received(slot, data, source, time.monotonic())
            self._pump(att)
        elif kind is Kind.QUIC:
            self.bridge.datagram_received(data, source, self.path_for(att, slot))
        else:
            self.stats["drop_extra_socket"] += 1

    def path_for(self, att: Attempt, slot: int) -> NodePath | KeptPath:
        """The QUIC path over socket ``slot``; an extra socket leaves the lease, kept."""
        if slot == 0:
            return self.node_path
        path = att.kept.get(slot)
        if path is None:
            assert att.lease is not None
            kept = att.lease.keep(slot)
            path = att.kept[slot] = KeptPath(kept)

            def on_kept(data: bytes, source: Address, path: KeptPath = path) -> None:
                kind = classify(data)
                if kind is Kind.QUIC:
                    self.bridge.datagram_received(data, source, path)
                elif kind is Kind.PUNCH:
                    self.datagram(slot, data, source)

            kept.on_datagram = on_kept
        return path

    def release_slot(self, att: Attempt, slot: int) -> None:
        path = att.kept.pop(slot, None)
        if path is not None:
            path.kept.close()

    def close_with(self, quic: PeerConnection, att: Attempt, slot: int) -> None:
        """Close the winning extra socket when the connection it carries ends."""
        path = att.kept.pop(slot, None)
        if path is None:
            return

        async def closer() -> None:
            with contextlib.suppress(Exception):
                await quic.wait_closed()
            path.kept.close()

        self._spawn(closer())

    def _pump(self, att: Attempt) -> None:
        plan = att.plan
        for s in plan.sends():
            if s.slot == 0:
                self.endpoint.send(s.data, s.addr)
            elif s.slot in att.kept:
                # The winning extra socket left the lease: its trailing probes and ACKs.
                att.kept[s.slot].send(s.data, s.addr)
            elif att.lease is not None:
                att.lease.send(s.slot, s.data, s.addr)
        if plan.result is not None and not att.result.done():
            att.result.set_result(plan.result)
            self._uncount(att)
            if isinstance(plan.result, Punched) and plan.result.slot:
                self.path_for(att, plan.result.slot)  # keep it before the lease closes
            if plan.initiator and att.lease is not None:
                # Our QUIC goes over the winning path only: give the other extra sockets back
                # now, not after the linger (back-to-back attempts would exhaust the pool). The
                # listener keeps its own until the client's QUIC arrives: the two sides may
                # have won on different sockets, and the client's choice is the one used.
                att.lease.close()
            self.stats["punch_ok" if isinstance(plan.result, Punched) else "punch_failed"] += 1
            self._on_result()
        deadline = plan.next_timer()
        if deadline is None and plan.result is not None:
            # Done: linger so the peer's trailing probes still get answered, then forget.
            deadline = time.monotonic() + ATTEMPT_LINGER
            if att.timer_at is not None and att.timer_at <= deadline:
                return
            self._arm(att, deadline, lambda: self.end(att))
            return
        if deadline is not None and att.timer_at != deadline:
            self._arm(att, deadline, lambda: self._on_timer(att))

    def _arm(self, att: Attempt, deadline: float, fn: Callable[[], None]) -> None:
        if att.timer is not None:
            att.timer.cancel()
        att.timer_at = deadline
        att.timer = asyncio.get_running_loop().call_later(
            max(0.0, deadline - time.monotonic()), fn
        )

    def _on_timer(self, att: Attempt) -> None:
        att.timer = None
        att.timer_at = None
        if att.ended:
            return
        att.plan.handle_timer(time.monotonic())
        self._pump(att)

    def _uncount(self, att: Attempt) -> None:
        """A finished attempt lingers (trailing probes) but no longer counts as running."""
        if att.counted:
            att.counted = False
            self._per_ip[att.peer_ip] -= 1
            if self._per_ip[att.peer_ip] <= 0:
                del self._per_ip[att.peer_ip]

    def end(self, att: Attempt) -> None:
        """Forget the attempt: its timer, lease, kept sockets and unused relayed path go."""
        if att.ended:
            return
        att.ended = True
        if att.timer is not None:
            att.timer.cancel()
        if not att.result.done():
            att.result.set_result(PunchFailed("cancelled"))
        self.attempts.pop(att.plan.attempt_id, None)
        self._uncount(att)
        if att.lease is not None:
            att.lease.close()
        for path in att.kept.values():
            path.kept.close()
        att.kept.clear()
        if att.relay is not None and att.plan.initiator:
            att.relay.close()  # never used: the connection went direct
            att.relay = None

    def close(self) -> None:
        """Cancel and forget every attempt."""
        for att in list(self.attempts.values()):
            att.plan.cancel()
            self.end(att)
