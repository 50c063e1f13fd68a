"""The storer side of topics: LOOKUP, ANNOUNCE and UNANNOUNCE answers, write tokens, expiry.

Owns the :class:`~dhtnode.dht.store.RecordStore` (the token issuer is the context's). A
LOOKUP answer hands out a write token for the requester's address and, once the requester
has proven its address with such a token, a fresh random share of the topic's records; writes
need that token (proof of the source address) and a valid signature, checked only after the
cheap checks. :meth:`Storage.announced_from` tells an introducer where
the holder of a key announced from.

Must not send requests of its own or decide the node's standing.
"""

from __future__ import annotations

from dhtnode.crypto import tokens
from dhtnode.dht.context import NodeContext
from dhtnode.dht.maintenance import Maintenance
from dhtnode.dht.records import (
    MAX_RECORDS_PER_MESSAGE,
    Record,
    RecordError,
    decode_single_record,
    decode_withdrawal,
    encode_record_list,
)
from dhtnode.dht.rpc import Rpc
from dhtnode.dht.store import PutResult, RecordStore
from dhtnode.wire import messages as m
from dhtnode.wire.address import Address

#: Seconds between expiry sweeps of the store.
EXPIRE_INTERVAL = 5.0


class Storage:
    def __init__(self, ctx: NodeContext, rpc: Rpc, maintenance: Maintenance) -> None:
        self._ctx = ctx
        self._rpc = rpc
        self._maintenance = maintenance
        p = ctx.params
        #: Shared with the RPC layer: a write token is also the holder's proof of address.
        self.tokens = ctx.tokens
        self.store = RecordStore(
            ttl=p.record_ttl,
            max_total=p.max_records,
            max_per_topic=p.max_records_per_topic,
            max_per_ip=p.max_records_per_ip,
        )
        rpc.register(m.Command.LOOKUP, self._on_lookup)
        rpc.register(m.Command.ANNOUNCE, self._on_announce)
        rpc.register(m.Command.UNANNOUNCE, self._on_unannounce)
        ctx.call_later(EXPIRE_INTERVAL, self._expire)

    def announced_from(self, topic: bytes, public_key: bytes) -> Address | None:
        """The address the live record of ``public_key`` under ``topic`` was written from."""
        held = self.store.held(topic, public_key, self._ctx.now)
        return held.source if held is not None else None

    def _expire(self) -> None:
        ctx = self._ctx
        expired = self.store.expire(ctx.now)
        if expired:
            ctx.stats["records_expired"] += expired
        if not ctx.standing.closed:
            ctx.call_later(EXPIRE_INTERVAL, self._expire)

    def _on_lookup(self, req: m.Request, source: Address) -> None:
        ctx = self._ctx
        if req.target is None:
            self._rpc.respond(req, source, error=m.ErrorCode.MISSING_FIELD)
            return
        nodes = self._maintenance.closer_nodes(req.target, source)
        if not ctx.standing.server:
            self._rpc.respond(req, source, nodes=nodes)
            return
        token = self.tokens.issue(source, ctx.now)
        live = self.store.get(req.target, ctx.now)
        if live and self._rpc.proof(req, source) == tokens.INVALID:
            # Records go only to a source that proved its address: a busy topic's answer is
            # 1.2 kB, what a reflection attack is after. MORE says "ask again with the token
            # in this answer" (one more round trip, for the storers that hold records only).
            ctx.stats["lookup_records_withheld"] += 1
            self._rpc.respond(req, source, token=token, nodes=nodes, more=True)
            return
        base = m.Response(req.command, req.tid, source, ctx.id_for(source), token, nodes,
                          network=ctx.params.network)
        budget = m.MAX_SEND_SIZE - len(m.encode_response(base)) - 3
        # A busy topic holds more than one answer fits: each answer is a fresh random share,
        # so that a lookup, which asks k storers, collects nearly all of it (not k copies of
        # the newest few).
        ctx.rng.shuffle(live)
        picked: list[Record] = []
        used = 0
        for rec in live[:MAX_RECORDS_PER_MESSAGE]:
            size = len(rec.body()) + len(rec.signature)
            if used + size > budget:
                continue  # a smaller record may still fit
            picked.append(rec)
            used += size
        value = encode_record_list(picked) if picked else None
        self._rpc.respond(req, source, token=token, nodes=nodes, value=value)

    def _check_write(self, req: m.Request, source: Address) -> bool:
        ctx = self._ctx
        if not ctx.standing.server:
            self._rpc.respond(req, source, error=m.ErrorCode.NOT_SERVING)
            return False
        if req.target is None or req.value is None or req.token is None:
            self._rpc.respond(req, source, error=m.ErrorCode.MISSING_FIELD)
            return False
        if not self.tokens.check(req.token, source, ctx.now):
            ctx.stats["drop_bad_token"] += 1
            self._rpc.respond(req, source, error=m.ErrorCode.BAD_TOKEN)
            return False
        # Per-source rate, only now that the token proved the source address: forged
        # requests cannot spend a victim's budget.
        if not self.store.allow_write(source[0], ctx.now):
            ctx.stats["drop_rate_limited"] += 1
            self._rpc.respond(req, source, error=m.ErrorCode.BUSY)
            return False
        return True

    def _on_announce(self, req: m.Request, source: Address) -> None:
        if not self._check_write(req, source):
            return
        assert req.target is not None and req.value is not None
        ctx = self._ctx
        respond = self._rpc.respond
        try:
            rec = decode_single_record(req.value)
        except RecordError:
            ctx.stats["drop_bad_records"] += 1
            respond(req, source, error=m.ErrorCode.BAD_RECORD)
            return
        # Cheap checks first (clock window, replay, the source's budget); the signature is
        # verified only for a record we would keep.
        refused = self.store.precheck(req.target, rec, source[0], ctx.wall())
        if refused is PutResult.FULL:
            ctx.stats["drop_store_full"] += 1
            respond(req, source, error=m.ErrorCode.FULL)
            return
        if refused is not None:
            ctx.stats["drop_stale_record"] += 1
            respond(req, source, error=m.ErrorCode.STALE)
            return
        if not rec.verify(req.target):
            ctx.stats["drop_bad_signature"] += 1
            respond(req, source, error=m.ErrorCode.BAD_RECORD)
            return
        result = self.store.put(req.target, rec, source[0], ctx.now, ctx.wall(), source)
        if result is PutResult.STALE:
            ctx.stats["drop_replayed_record"] += 1
            respond(req, source, error=m.ErrorCode.STALE)
        elif result is PutResult.FULL:
            ctx.stats["drop_store_full"] += 1
            respond(req, source, error=m.ErrorCode.FULL)
        else:
            ctx.stats["records_stored"] += 1
            respond(req, source)

    def _on_unannounce(self, req: m.Request, source: Address) -> None:
        if not self._check_write(req, source):
            return
        assert req.target is not None and req.value is not None
        ctx = self._ctx
        try:
            w = decode_withdrawal(req.value)
        except RecordError:
            ctx.stats["drop_bad_records"] += 1
            self._rpc.respond(req, source, error=m.ErrorCode.BAD_RECORD)
            return
        # Cheap checks (clock window, newer than what is held) before the signature.
        if not self.store.precheck_withdrawal(req.target, w, ctx.wall()):
            ctx.stats["drop_stale_withdrawal"] += 1
            self._rpc.respond(req, source, error=m.ErrorCode.STALE)
            return
        if not w.verify(req.target):
            ctx.stats["drop_bad_signature"] += 1
            self._rpc.respond(req, source, error=m.ErrorCode.BAD_RECORD)
            return
        if self.store.withdraw(req.target, w, ctx.now, ctx.wall(), source[0]):
            self._rpc.respond(req, source)
        else:
            self._rpc.respond(req, source, error=m.ErrorCode.STALE)
