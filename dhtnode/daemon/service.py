"""Running the long-lived daemon (``dhtnode run``). Short-lived client nodes live in
``client.py``, what both share in ``wiring.py`` (re-exported here for callers).

Owns wiring and life cycle: state dir, identity, node cache, socket, control socket, signal
handling, periodic cache saves, and a clean shutdown (withdraw announcements, save the cache).
Protocol decisions stay in ``dhtnode.dht``; this file only calls the engine's operations.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

from dhtnode.connect.services import plug_in
from dhtnode.crypto.identity import Identity, load_or_create_identity
from dhtnode.daemon import sdnotify
from dhtnode.daemon.client import ClientNode, client_node, ping_key
from dhtnode.daemon.config import Config
from dhtnode.daemon.control import ControlServer, check_socket_path
from dhtnode.daemon.state import (
    IDENTITY_FILE,
    ensure_state_dir,
    load_announced,
    load_node_cache,
    save_announced,
    save_node_cache,
    service_key_path,
)
from dhtnode.daemon.wiring import (
    identity_path,
    log,
    log_event,
    params_from_config,
    record_to_json,
    resolve,
)
from dhtnode.dht.ids import parse_topic
from dhtnode.dht.node import DhtNode, LookupResult
from dhtnode.dht.op import Op, OperationError
from dhtnode.dht.store import PREFIX_BUDGET_FACTOR
from dhtnode.errors import DhtnodeError
from dhtnode.transport.connections import Connections
from dhtnode.transport.udp import NodeEndpoint, open_udp_socket
from dhtnode.wire import address as wire_address
from dhtnode.wire.address import Address

__all__ = [
    "ClientNode",
    "Daemon",
    "client_node",
    "identity_path",
    "params_from_config",
    "ping_key",
    "record_to_json",
    "resolve",
]

#: Seconds between node cache saves while running.
CACHE_SAVE_INTERVAL = 60.0
#: Seconds a clean shutdown waits for withdrawals to be acknowledged.
SHUTDOWN_GRACE = 3.0



class Daemon:
    def __init__(self, cfg: Config, reload: Callable[[], Config] | None = None) -> None:
        """``reload``: reads the configuration again (the file and the command line) on
        SIGHUP; None: SIGHUP only logs that there is nothing to reload from."""
        self.cfg = cfg
        self._reload = reload
        #: What the bootstrap names (``node.bootstrap``) resolved to last time.
        self._config_seeds: list[Address] = []
        #: The re-resolution running for a rejoin, if any (one at a time).
        self._resolving: asyncio.Task[None] | None = None
        self._reloads: set[asyncio.Task[Any]] = set()
        self.metrics: Any = None
        self.endpoint: NodeEndpoint | None = None
        self.connections: Connections | None = None
        self._forwarding: list[Any] = []
        self.control: ControlServer | None = None
        self.identity: Identity | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        #: One state-file save at a time (saves run in a worker thread).
        self._save_lock = asyncio.Lock()
        self.started_at = time.time()

    @property
    def node(self) -> DhtNode:
        assert self.endpoint is not None
        return self.endpoint.node

    async def start(self) -> None:
        cfg = self.cfg
        check_socket_path(cfg.control_socket_path)  # before anything is created
        state_dir = ensure_state_dir(cfg.node.state_dir)
        self.identity, created = load_or_create_identity(state_dir / IDENTITY_FILE)
        if created:
            log.info("identity_created", path=str(state_dir / IDENTITY_FILE))
        cached = load_node_cache(state_dir)
        seeds = await resolve(cfg.node.bootstrap)
        sock = open_udp_socket(cfg.node.host, cfg.node.port)
        local = wire_address.normalize(sock.getsockname())
        public: Address | None = None
        if cfg.node.bootstrap_node:
            host = cfg.node.public_host or cfg.node.host
            if host not in ("", "0.0.0.0", "::"):
                public = (host, local[1])
        node = DhtNode(
            self.identity,
            params_from_config(cfg),
            now=time.monotonic(),
            wall=time.time,
            public_address=public,
            assume_reachable=cfg.node.bootstrap_node,
            seeds=seeds + [a for a in cached if a not in seeds],
        )
        services = plug_in(node, relay=cfg.relay.enabled, relay_limits=cfg.relay.limits())
        self.endpoint = await NodeEndpoint.create_on(sock, node, on_event=log_event)
        self.connections = Connections(self.endpoint, services, on_event=log_event)
        self._config_seeds = list(seeds)
        node.on_rejoin = self._on_rejoin
        if cfg.metrics.listen:
            from dhtnode.daemon.metrics import MetricsServer  # prometheus_client: only if on

            self.metrics = MetricsServer(cfg.metrics.listen, self.endpoint,
                                         self._metrics_status, self.started_at)
            await self.metrics.start()
            host, port = self.metrics.address
            shown = f"[{host}]" if ":" in host else host
            log.info("metrics_started", url=f"http://{shown}:{port}/metrics")
        self.control = ControlServer(cfg.control_socket_path, self._handle_control,
                                     group=cfg.control.group)
        await self.control.start()
        log.info(
            "node_started",
            bind=wire_address.format_addr(local),
            public_key=self.identity.public_key.hex(),
            state_dir=str(state_dir),
            bootstrap=[wire_address.format_addr(a) for a in seeds],
            cached_nodes=len(cached),
            bootstrap_node=cfg.node.bootstrap_node,
            public_address=wire_address.format_addr(public) if public else None,
            control_socket=str(cfg.control_socket_path),
        )
        if cfg.node.bootstrap_node and public is None:
            log.warning(
                "bootstrap_node_without_public_address",
                hint="bound to a wildcard address and no --public-host (node.public_host): "
                "the node serves only once another node tells it its address. Give "
                "--public-host YOUR.PUBLIC.IP so it serves at once",
            )
        if cfg.node.public_host and not cfg.node.bootstrap_node:
            log.warning(
                "public_host_ignored",
                hint="--public-host (node.public_host) is used only with --bootstrap-node; "
                "other nodes learn their address from the network",
            )
        if not seeds and not cached:
            join_host = public[0] if public else "<this host's IP>"
            if public and ":" in join_host:
                join_host = f"[{join_host}]"
            log.info(
                "first_node_of_network",
                hint=f"others join with: dhtnode run --bootstrap {join_host}:{local[1]}",
            )
        self._tasks.append(asyncio.create_task(self._join()))
        self._tasks.append(asyncio.create_task(self._save_cache_periodically()))

    async def _join(self) -> None:
        assert self.endpoint is not None
        size = await self.endpoint.run(lambda n: n.bootstrap())
        log.info("bootstrap_done", routing_table_size=size)
        if size == 0 and self.node.queries.seeds:
            log.warning(
                "bootstrap_unanswered",
                seeds=[wire_address.format_addr(a) for a in self.node.queries.seeds[:8]],
                hint="no bootstrap node answered: check each --bootstrap HOST:PORT, that the "
                "node there runs, and that UDP to it is not blocked",
            )
        await self._restore_announcements()
        await self._start_forwarding()

    async def _restore_announcements(self) -> None:
        """Announce again what was announced through the daemon before a restart."""
        assert self.endpoint is not None
        topics = load_announced(self.cfg.node.state_dir)
        def announcing(topic: bytes) -> Callable[[DhtNode], Op[int]]:
            return lambda n: n.announce(topic)

        for topic in topics:
            try:
                stored = await self.endpoint.run(announcing(topic))
            except DhtnodeError as exc:
                stored = 0
                log.warning("announce_restore_failed", topic=topic.hex(), error=str(exc),
                            hint="kept: it is announced again on the next refresh")
            log.info("announcement_restored", topic=topic.hex(), stored_on=stored)

    async def _save_announced(self) -> None:
        """Save the announced topics off the event loop: the atomic write fsyncs twice, and a
        stalled disk must not stall every datagram the node handles. One save at a time, so
        an older list can never be renamed over a newer one."""
        topics = list(self.node.announced_topics)  # the list as of now, taken on the loop
        async with self._save_lock:
            with contextlib.suppress(DhtnodeError, OSError):
                await asyncio.to_thread(save_announced, self.cfg.node.state_dir, topics)

    async def _start_forwarding(self) -> None:
        """The ``[[expose]]`` and ``[[forward]]`` entries of the config. A failure is logged
        and retried: the network may not be up yet, or the other side not yet listening."""
        from dhtnode.transport.forward import Exposer, Forwarder

        assert self.connections is not None
        cfg = self.cfg
        for e in cfg.expose:
            ident, _ = load_or_create_identity(
                e.key_file or service_key_path(cfg.node.state_dir, e.target)
            )
            allowed = set(e.allow)
            exposer = Exposer(self.connections, ident, e.target,
                              allow=None if e.public else allowed.__contains__,
                              on_event=log_event)
            self._forwarding.append(exposer)
            self._tasks.append(asyncio.create_task(self._keep_trying(
                exposer.start, "expose", target=f"{e.target[0]}:{e.target[1]}",
                public_key=ident.public_key.hex())))
        for f in cfg.forward:
            fwd = Forwarder(self.connections, f.public_key, f.listen, identity=self.identity,
                            on_event=log_event)
            self._forwarding.append(fwd)
            self._tasks.append(asyncio.create_task(self._keep_trying(
                fwd.start, "forward", listen=f"{f.listen[0]}:{f.listen[1]}",
                public_key=f.public_key.hex())))

    async def _keep_trying(self, start: Callable[[], Awaitable[Any]], what: str,
                           **fields: Any) -> None:
        delay = 1.0
        while True:
            try:
                await start()
                log.info(f"{what}_started", **fields)
                return
            except (DhtnodeError, OSError) as exc:
                log.warning(f"{what}_failed", error=str(exc), retry_in=delay, **fields)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)

    async def _save_cache_periodically(self) -> None:
        while True:
            await asyncio.sleep(CACHE_SAVE_INTERVAL)
            nodes = [c.addr for c in self.node.table] if self.endpoint is not None else []
            if not nodes:
                continue
            # Off the loop, as _save_announced; on shutdown save_cache() writes inline.
            async with self._save_lock:
                try:
                    await asyncio.to_thread(save_node_cache, self.cfg.node.state_dir, nodes,
                                            now=time.time())
                except OSError as exc:
                    log.warning("node_cache_save_failed", error=str(exc),
                                hint="check the state dir's disk and permissions")

    def save_cache(self) -> None:
        if self.endpoint is None:
            return
        nodes = [c.addr for c in self.node.table]
        if nodes:
            save_node_cache(self.cfg.node.state_dir, nodes, now=time.time())

    def request_stop(self) -> None:
        self._stop.set()

    def _metrics_status(self) -> dict[str, Any]:
        return self.node.status()

    async def run_forever(self) -> None:
        """Until SIGTERM or SIGINT (a clean stop); SIGHUP reloads the configuration. Tells
        systemd (``Type=notify``) READY, STOPPING and, if it asks, WATCHDOG."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        sdnotify.ready("serving the DHT on "
                       + (wire_address.format_addr(self.endpoint.local_address)
                          if self.endpoint is not None else "?"))
        interval = sdnotify.watchdog_interval()
        if interval is not None:
            self._tasks.append(asyncio.create_task(self._watchdog(interval)))
        await self._stop.wait()
        sdnotify.stopping()
        log.info("shutdown_started")
        await self.stop()
        log.info("shutdown_done")

    async def _watchdog(self, interval: float) -> None:
        while True:
            sdnotify.watchdog()
            await asyncio.sleep(interval)

    def _on_sighup(self) -> None:
        task = asyncio.create_task(self.reload())
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def reload(self) -> list[str]:
        """Apply a re-read configuration: log level, bootstrap list and record limits take
        effect at once; every other changed setting is logged as needing a restart. Returns
        the settings applied. A bad config file is logged and changes nothing."""
        if self._reload is None:
            log.warning("reload_skipped", reason="no configuration source to reload from")
            return []
        sdnotify.reloading()
        try:
            new = self._reload()
        except DhtnodeError as exc:
            log.error("reload_failed", error=str(exc), hint="the running configuration is kept")
            sdnotify.ready()
            return []
        old = self.cfg
        applied: list[str] = []
        if new.log.level != old.log.level:
            from dhtnode.daemon.logging import configure_logging

            configure_logging(new.log.level, old.log.format)
            if self.endpoint is not None:
                node = self.node
                node.params = node.ctx.params = dataclasses.replace(
                    node.params, rpc_trace=new.log.level == "debug")
            applied.append("log.level")
        if new.node.bootstrap or old.node.bootstrap:
            # Names are resolved again on every reload, changed or not: the reload is how an
            # operator says "a bootstrap node moved".
            seeds = await resolve(new.node.bootstrap)
            if self.endpoint is not None:
                self._use_seeds(seeds, new.node.bootstrap)
                if len(self.node.table) == 0 and seeds:
                    self._tasks.append(asyncio.create_task(self._join_again()))
            if new.node.bootstrap != old.node.bootstrap:
                applied.append("node.bootstrap")
        if new.records != old.records and self.endpoint is not None:
            r = new.records
            node = self.node
            store = node.store
            store.max_total = r.max_total
            store.max_per_topic = r.max_per_topic
            store.max_per_ip = r.max_per_ip
            store.max_per_prefix = r.max_per_ip * PREFIX_BUDGET_FACTOR
            node.params = node.ctx.params = dataclasses.replace(
                node.params, max_records=r.max_total, max_records_per_topic=r.max_per_topic,
                max_records_per_ip=r.max_per_ip)
            applied += [f"records.{k}" for k in ("max_total", "max_per_topic", "max_per_ip")
                        if getattr(r, k) != getattr(old.records, k)]
        kept = _changed_settings(old, new) - set(applied) - {"log.format"}
        applied_cfg = dataclasses.replace(
            old, log=dataclasses.replace(old.log, level=new.log.level),
            node=dataclasses.replace(old.node, bootstrap=new.node.bootstrap),
            records=dataclasses.replace(new.records, ttl=old.records.ttl))
        self.cfg = applied_cfg
        log.info("reloaded", applied=sorted(applied) or None,
                 log_level=new.log.level,
                 bootstrap=[f"{h}:{p}" for h, p in new.node.bootstrap])
        if kept or new.log.format != old.log.format:
            log.warning("reload_needs_restart",
                        settings=sorted(kept | ({"log.format"} if new.log.format != old.log.format
                                                else set())),
                        hint="these settings changed but take effect only after a restart")
        sdnotify.ready()
        return applied

    async def _join_again(self, after: str = "reload") -> None:
        assert self.endpoint is not None
        size = await self.endpoint.run(lambda n: n.bootstrap())
        log.info("bootstrap_done", routing_table_size=size, after=after)

    def _use_seeds(self, seeds: list[Address], names: tuple[tuple[str, int], ...]) -> bool:
        """Make ``seeds`` (the bootstrap names resolved afresh) the engine's configured seeds,
        in place of what they resolved to before; seeds learned otherwise (the node cache) are
        kept. True if the addresses changed."""
        q = self.node.queries
        learned = [a for a in q.seeds if a not in self._config_seeds]
        q.seeds = list(dict.fromkeys(seeds + learned))
        changed = seeds != self._config_seeds
        if changed:
            log.info("bootstrap_resolved", bootstrap=[f"{h}:{p}" for h, p in names],
                     addresses=[wire_address.format_addr(a) for a in seeds],
                     before=[wire_address.format_addr(a) for a in self._config_seeds])
        self._config_seeds = list(seeds)
        return changed

    def _on_rejoin(self) -> None:
        """The engine's table is empty and it rejoins through its seeds: resolve the
        bootstrap names again (the engine does no I/O), at most one resolution at a time."""
        if not self.cfg.node.bootstrap or (self._resolving is not None
                                           and not self._resolving.done()):
            return
        self._resolving = asyncio.create_task(self._reresolve())
        self._tasks = [t for t in self._tasks if not t.done()]
        self._tasks.append(self._resolving)

    async def _reresolve(self) -> None:
        seeds = await resolve(self.cfg.node.bootstrap)
        if not seeds or self.endpoint is None or self._stop.is_set():
            return  # no answer from DNS (logged): the old addresses beat none
        # The engine's own rejoin lookup already went to the old addresses; new ones are
        # tried at once rather than at the next growth tick (up to rejoin_interval away).
        if self._use_seeds(seeds, self.cfg.node.bootstrap) and seeds and len(self.node.table) == 0:
            await self._join_again(after="rejoin")

    async def stop(self) -> None:
        for t in list(self._reloads):
            t.cancel()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, DhtnodeError):
                await t
        self._tasks.clear()
        if self.endpoint is not None:
            try:
                withdrawn = await asyncio.wait_for(
                    self.endpoint.run(lambda n: n.close()), SHUTDOWN_GRACE
                )
                log.info("announcements_withdrawn", acknowledged=withdrawn)
            except (TimeoutError, OperationError) as exc:
                log.warning("withdraw_incomplete", error=str(exc) or "timeout")
            self.save_cache()
            for f in self._forwarding:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(f.close(), 2.0)
            if self.connections is not None:
                await self.connections.close()
            self.endpoint.close()
        if self.metrics is not None:
            await self.metrics.close()
        if self.control is not None:
            await self.control.close()

    async def _handle_control(self, req: dict[str, Any]) -> dict[str, Any]:
        assert self.endpoint is not None and self.identity is not None
        cmd = req["cmd"]
        if cmd == "status":
            st = self.node.status()
            st["public_key"] = self.identity.public_key.hex()
            st["bind_address"] = wire_address.format_addr(self.endpoint.local_address)
            st["uptime"] = round(time.time() - self.started_at, 1)
            st["network"] = self.cfg.node.network
            st["warnings"] = []
            if st["routing_table_size"] == 0:
                st["warnings"].append(
                    "the routing table is empty: no DHT node has answered. Check --bootstrap "
                    "(node.bootstrap) and that UDP reaches it; see the bootstrap_unanswered log"
                    if self.node.queries.seeds else
                    "the routing table is empty: this is the first node; others join with "
                    "--bootstrap pointing here"
                )
            return st
        if cmd in ("announce", "unannounce", "lookup"):
            try:
                topic = parse_topic(str(req.get("topic", "")))
            except ValueError as exc:
                raise DhtnodeError(f"topic: {exc}") from None
            key = self.identity.public_key.hex()
            if cmd == "announce":
                n = await self.endpoint.run(lambda node: node.announce(topic))
                await self._save_announced()
                pub = self.node.ctx.standing.public
                return {"topic": topic.hex(), "stored_on": n, "public_key": key,
                        "public_address": wire_address.format_addr(pub) if pub else None}
            if cmd == "unannounce":
                if topic not in self.node.announced_topics:
                    return {"topic": topic.hex(), "withdrawn_from": 0, "public_key": key,
                            "was_announced": False}
                n = await self.endpoint.run(lambda node: node.unannounce(topic))
                await self._save_announced()
                return {"topic": topic.hex(), "withdrawn_from": n, "public_key": key,
                        "was_announced": True}
            res: LookupResult = await self.endpoint.run(lambda node: node.lookup(topic))
            return {"records": [record_to_json(topic, r) for r in res.records],
                    "responses": res.responses}
        if cmd == "nodes":
            now = self.node.ctx.now
            contacts = sorted(self.node.table, key=lambda c: c.id)
            return {
                "nodes": [wire_address.format_addr(c.addr) for c in contacts],
                # `dhtnode peers`: see PEER_KEYS in cli/main.py.
                "peers": [
                    {"node_id": c.id.hex(), "address": wire_address.format_addr(c.addr),
                     "last_seen_s": round(max(0.0, now - c.last_seen), 1),
                     "rtt_ms": round(c.rtt * 1000, 2) if c.rtt is not None else None,
                     "failures": c.failures}
                    for c in contacts
                ],
            }
        if cmd == "ping_key":
            assert self.connections is not None
            return await ping_key(self.connections, str(req.get("public_key", "")))
        raise DhtnodeError(f"unknown control command {cmd!r}; known: status, announce, "
                           "unannounce, lookup, nodes, ping_key")


def _changed_settings(old: Config, new: Config) -> set[str]:
    """``table.key`` of every setting that differs (arrays of tables by their table name)."""
    out: set[str] = set()
    for f in dataclasses.fields(old):
        a, b = getattr(old, f.name), getattr(new, f.name)
        if a == b:
            continue
        if dataclasses.is_dataclass(a):
            out |= {f"{f.name}.{g.name}" for g in dataclasses.fields(a)
                    if getattr(a, g.name) != getattr(b, g.name)}
        else:
            out.add(f.name)
    return out
