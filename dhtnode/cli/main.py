"""The ``dhtnode`` command line: argument parsing, output formatting, exit codes.

Exit codes: 0 ok, 1 failure (network, nothing found), 2 usage error (bad argument or config;
the message names the field and what is allowed). Results go to stdout (``--json``: one object
per line, stable keys); logs go to stderr.

Each verb is a small function that builds a config and calls ``dhtnode.daemon.service``;
no protocol logic lives here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from dhtnode import __version__
from dhtnode.errors import ConfigError, DhtnodeError
from dhtnode.wire.address import format_addr

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class UsageError(DhtnodeError):
    """A command-line argument is invalid (exit code 2)."""


def _common(p: argparse.ArgumentParser, *, log_default: str | None = None) -> None:
    p.add_argument("--config", type=Path, help="TOML config file (see config.example.toml)")
    p.add_argument("--state-dir", type=Path, help="directory for the identity key and node cache")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                   default=log_default, help="log verbosity (logs go to stderr)")
    p.add_argument("--log-format", choices=["auto", "json", "console"],
                   help="auto = JSON lines unless stderr is a terminal")


def _net(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap", action="append", metavar="HOST:PORT", default=None,
                   help="a DHT node to join through (repeatable)")
    p.add_argument("--host", help="local address to bind (default from config)")


def _topic_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("topic", nargs="?", help="topic as 64 hex characters")
    p.add_argument("--topic-name", help="derive the topic from a name (BLAKE2b-256)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dhtnode",
        description="Kademlia DHT node with a STUN reflector and signed topic records.",
    )
    parser.add_argument("--version", action="version", version=f"dhtnode {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the long-lived node (the daemon)")
    _common(p)
    _net(p)
    p.add_argument("--port", type=int, help="UDP port for DHT, STUN and (later) QUIC")
    p.add_argument("--bootstrap-node", action="store_true", default=None,
                   help="first node of a network on a public address: serve at once")
    p.add_argument("--public-host", help="public IP to advertise with --bootstrap-node")

    p = sub.add_parser("status", help="ask the running daemon for its state")
    _common(p)
    p.add_argument("--json", action="store_true", help="one JSON object")

    p = sub.add_parser("announce", help="announce a topic from a short-lived node")
    _common(p, log_default="warning")
    _net(p)
    _topic_args(p)
    p.add_argument("--keep-alive", type=float, default=0.0, metavar="SECONDS",
                   help="stay up this long, refreshing the record, then withdraw it")
    p.add_argument("--via-daemon", action="store_true",
                   help="ask the running daemon to announce (it keeps refreshing it)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("unannounce", help="withdraw a topic announcement")
    _common(p, log_default="warning")
    _net(p)
    _topic_args(p)
    p.add_argument("--via-daemon", action="store_true")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("lookup", help="find the records announced for a topic")
    _common(p, log_default="warning")
    _net(p)
    _topic_args(p)
    p.add_argument("--via-daemon", action="store_true", help="look up through the running daemon")
    p.add_argument("--json", action="store_true", help="one JSON object per record")

    p = sub.add_parser("ping", help="ping a DHT node")
    _common(p, log_default="warning")
    p.add_argument("address", metavar="HOST:PORT")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("stun", help="ask a STUN server (any dhtnode) for our public address")
    _common(p, log_default="warning")
    p.add_argument("address", metavar="HOST:PORT")
    p.add_argument("--timeout", type=float, default=1.0, help="seconds per attempt")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("keygen", help="create the identity key (never overwrites one)")
    _common(p, log_default="warning")
    p.add_argument("--out", type=Path, help="key file (default: <state dir>/identity.key)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("topic", help="print the topic key derived from a name")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    return parser


# --------------------------------------------------------------------------- helpers


def _config(args: argparse.Namespace) -> Any:
    from dhtnode.daemon.config import apply_overrides, load_config

    cfg = load_config(args.config)
    if getattr(args, "port", None) is not None and not 0 <= args.port <= 65535:
        raise ConfigError("--port", f"must be 0-65535, got {args.port}")
    return apply_overrides(
        cfg,
        host=getattr(args, "host", None),
        port=getattr(args, "port", None),
        bootstrap=getattr(args, "bootstrap", None),
        state_dir=args.state_dir,
        bootstrap_node=getattr(args, "bootstrap_node", None),
        public_host=getattr(args, "public_host", None),
        log_level=args.log_level,
        log_format=args.log_format,
    )


def _setup_logging(cfg: Any) -> None:
    from dhtnode.daemon.logging import configure_logging

    configure_logging(cfg.log.level, cfg.log.format)


def _topic(args: argparse.Namespace) -> bytes:
    from dhtnode.dht.ids import parse_topic, topic_from_name

    if args.topic and args.topic_name:
        raise UsageError("give either TOPIC or --topic-name, not both")
    if args.topic_name:
        return topic_from_name(args.topic_name)
    if not args.topic:
        raise UsageError("a topic is required: TOPIC (64 hex characters) or --topic-name NAME")
    try:
        return parse_topic(args.topic)
    except ValueError as exc:
        raise UsageError(f"TOPIC: {exc}") from None


def _emit(obj: dict[str, Any], as_json: bool, text: str) -> None:
    if as_json:
        print(json.dumps(obj, separators=(",", ":"), sort_keys=True), flush=True)
    else:
        print(text, flush=True)


def _run_async(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop

        return int(uvloop.run(coro))
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(coro)


# --------------------------------------------------------------------------- verbs


def cmd_run(args: argparse.Namespace) -> int:
    from dhtnode.daemon.service import Daemon

    cfg = _config(args)
    _setup_logging(cfg)

    async def main() -> int:
        d = Daemon(cfg)
        await d.start()
        await d.run_forever()
        return EXIT_OK

    return _run_async(main())


def _control_path(args: argparse.Namespace) -> Path:
    cfg = _config(args)
    return Path(cfg.control_socket_path)


def cmd_status(args: argparse.Namespace) -> int:
    from dhtnode.daemon import control

    path = _control_path(args)
    st = asyncio.run(control.request(path, "status"))
    text = "\n".join(
        [
            f"node id:        {st['node_id'] or '(none: client mode)'}",
            f"public key:     {st['public_key']}",
            f"bind address:   {st['bind_address']}",
            f"public address: {st['public_address'] or '(not yet known)'}",
            f"NAT class:      {st['nat_class']}",
            f"reachable:      {'yes' if st['reachable'] else 'no'}",
            f"serving:        {'yes' if st['server'] else 'no'}",
            f"routing table:  {st['routing_table_size']} nodes",
            f"records stored: {st['records_stored']} ({st['topics_stored']} topics)",
            f"announced:      {len(st['announced_topics'])} topics",
            f"uptime:         {st['uptime']} s",
        ]
    )
    _emit(st, args.json, text)
    return EXIT_OK


def _bootstrap_list(args: argparse.Namespace, cfg: Any) -> Any:
    return None if not args.bootstrap else list(cfg.node.bootstrap)


def cmd_announce(args: argparse.Namespace) -> int:
    topic = _topic(args)
    if args.keep_alive < 0:
        raise UsageError(f"--keep-alive: must be >= 0 seconds, got {args.keep_alive}")
    if args.via_daemon:
        from dhtnode.daemon import control

        res = asyncio.run(control.request(_control_path(args), "announce", topic=topic.hex()))
        _emit(res, args.json, f"announced {topic.hex()} on {res['stored_on']} nodes (daemon)")
        return EXIT_OK if res["stored_on"] else EXIT_FAILURE
    cfg = _config(args)
    _setup_logging(cfg)

    async def main() -> int:
        from dhtnode.crypto.identity import load_or_create_identity
        from dhtnode.daemon.service import client_node, identity_path, resolve
        from dhtnode.daemon.state import ensure_state_dir

        ensure_state_dir(cfg.node.state_dir)
        ident, _ = load_or_create_identity(identity_path(cfg.node.state_dir))
        seeds = await resolve(cfg.node.bootstrap) if args.bootstrap else None
        async with client_node(cfg, identity=ident, bootstrap=seeds) as c:
            stored = await c.endpoint.run(lambda n: n.announce(topic, refresh=args.keep_alive > 0))
            pub = c.node.public
            _emit(
                {
                    "event": "announced",
                    "topic": topic.hex(),
                    "public_key": ident.public_key.hex(),
                    "stored_on": stored,
                    "public_address": format_addr(pub) if pub else None,
                    "keep_alive": args.keep_alive,
                },
                args.json,
                f"announced {topic.hex()} as {ident.public_key.hex()} on {stored} nodes",
            )
            if not stored:
                return EXIT_FAILURE
            if args.keep_alive > 0:
                stop = asyncio.Event()
                loop = asyncio.get_running_loop()
                import signal

                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.add_signal_handler(sig, stop.set)
                try:
                    await asyncio.wait_for(stop.wait(), args.keep_alive)
                except TimeoutError:
                    pass
                try:
                    gone = await asyncio.wait_for(c.endpoint.run(lambda n: n.close()), 5.0)
                except (TimeoutError, DhtnodeError):
                    gone = 0
                _emit_unannounced(args, topic, gone)
            return EXIT_OK

    return _run_async(main())


def _emit_unannounced(args: argparse.Namespace, topic: bytes, gone: int) -> None:
    _emit({"event": "unannounced", "topic": topic.hex(), "withdrawn_from": gone},
          args.json, f"withdrew {topic.hex()} from {gone} nodes")


def cmd_unannounce(args: argparse.Namespace) -> int:
    topic = _topic(args)
    if args.via_daemon:
        from dhtnode.daemon import control

        res = asyncio.run(control.request(_control_path(args), "unannounce", topic=topic.hex()))
        _emit(res, args.json, f"withdrew {topic.hex()} from {res['withdrawn_from']} nodes")
        return EXIT_OK
    cfg = _config(args)
    _setup_logging(cfg)

    async def main() -> int:
        from dhtnode.crypto.identity import load_or_create_identity
        from dhtnode.daemon.service import client_node, identity_path, resolve

        ident, _ = load_or_create_identity(identity_path(cfg.node.state_dir))
        seeds = await resolve(cfg.node.bootstrap) if args.bootstrap else None
        async with client_node(cfg, identity=ident, bootstrap=seeds) as c:
            gone = await c.endpoint.run(lambda n: n.unannounce(topic))
        _emit_unannounced(args, topic, gone)
        return EXIT_OK

    return _run_async(main())


def cmd_lookup(args: argparse.Namespace) -> int:
    from dhtnode.daemon.service import record_to_json

    topic = _topic(args)
    records: list[dict[str, Any]]
    if args.via_daemon:
        from dhtnode.daemon import control

        res = asyncio.run(control.request(_control_path(args), "lookup", topic=topic.hex()))
        records = list(res["records"])
    else:
        cfg = _config(args)
        _setup_logging(cfg)

        async def main() -> list[dict[str, Any]]:
            from dhtnode.daemon.service import client_node, resolve

            seeds = await resolve(cfg.node.bootstrap) if args.bootstrap else None
            async with client_node(cfg, bootstrap=seeds) as c:
                res = await c.endpoint.run(lambda n: n.lookup(topic))
                return [record_to_json(topic, r) for r in res.records]

        records = asyncio.run(main())
    for r in records:
        addrs = ", ".join(f"{a['kind']} {a['address']}" for a in r["addresses"]) or "-"
        _emit(r, args.json, f"{r['public_key']}  seq={r['seq']}  {addrs}")
    if not records and not args.json:
        print(f"no records for {topic.hex()}", file=sys.stderr)
    return EXIT_OK if records else EXIT_FAILURE


def cmd_ping(args: argparse.Namespace) -> int:
    from dhtnode.wire.address import parse_host_port

    try:
        host, port = parse_host_port(args.address)
    except ValueError as exc:
        raise UsageError(f"HOST:PORT: {exc}") from None
    cfg = _config(args)
    _setup_logging(cfg)

    async def main() -> int:
        from dhtnode.crypto.identity import Identity
        from dhtnode.daemon.service import params_from_config, resolve
        from dhtnode.dht.node import DhtNode
        from dhtnode.transport.udp import NodeEndpoint

        targets = await resolve([(host, port)])
        if not targets:
            raise DhtnodeError(f"cannot resolve {host}")
        node = DhtNode(Identity.generate(), params_from_config(cfg), now=time.monotonic(),
                       wall=time.time, ephemeral=True)
        ep = await NodeEndpoint.create(node, "0.0.0.0" if ":" not in targets[0][0] else "::", 0)
        try:
            t0 = time.monotonic()
            resp = await ep.run(lambda n: n.ping(targets[0]))
            rtt = (time.monotonic() - t0) * 1000
        finally:
            ep.close()
        seen = format_addr(resp.to)
        _emit(
            {"address": format_addr(targets[0]), "rtt_ms": round(rtt, 3),
             "node_id": resp.id.hex() if resp.id else None, "seen_as": seen},
            args.json,
            f"{args.address}: rtt {rtt:.2f} ms, node id {resp.id.hex() if resp.id else '(client)'}"
            f", sees us as {seen}",
        )
        return EXIT_OK

    return _run_async(main())


def cmd_stun(args: argparse.Namespace) -> int:
    from dhtnode.nat.stun_client import stun_query
    from dhtnode.wire.address import parse_host_port

    try:
        host, port = parse_host_port(args.address)
    except ValueError as exc:
        raise UsageError(f"HOST:PORT: {exc}") from None
    if args.timeout <= 0:
        raise UsageError(f"--timeout: must be > 0 seconds, got {args.timeout}")

    async def main() -> int:
        from dhtnode.daemon.service import resolve

        targets = await resolve([(host, port)])
        if not targets:
            raise DhtnodeError(f"cannot resolve {host}")
        mapped = await stun_query(targets[0], timeout=args.timeout)
        _emit({"server": args.address, "mapped_address": format_addr(mapped)},
              args.json, f"mapped address: {mapped[0]}:{mapped[1]}")
        return EXIT_OK

    return asyncio.run(main())


def cmd_keygen(args: argparse.Namespace) -> int:
    from dhtnode.crypto.identity import load_or_create_identity
    from dhtnode.daemon.service import identity_path
    from dhtnode.daemon.state import ensure_state_dir

    cfg = _config(args)
    if args.out is None:
        ensure_state_dir(cfg.node.state_dir)
    path = args.out or identity_path(cfg.node.state_dir)
    ident, created = load_or_create_identity(path)
    _emit({"path": str(path), "public_key": ident.public_key.hex(), "created": created},
          args.json,
          f"{'created' if created else 'existing key kept'}: {path}\npublic key: "
          f"{ident.public_key.hex()}")
    return EXIT_OK


def cmd_topic(args: argparse.Namespace) -> int:
    from dhtnode.dht.ids import topic_from_name

    t = topic_from_name(args.name).hex()
    _emit({"name": args.name, "topic": t}, args.json, t)
    return EXIT_OK


VERBS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run,
    "status": cmd_status,
    "announce": cmd_announce,
    "unannounce": cmd_unannounce,
    "lookup": cmd_lookup,
    "ping": cmd_ping,
    "stun": cmd_stun,
    "keygen": cmd_keygen,
    "topic": cmd_topic,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return VERBS[args.verb](args)
    except (ConfigError, UsageError) as exc:
        print(f"dhtnode {args.verb}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except DhtnodeError as exc:
        print(f"dhtnode {args.verb}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE
