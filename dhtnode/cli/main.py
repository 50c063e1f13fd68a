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
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dhtnode import __version__
from dhtnode.cli import connect as connect_verbs
from dhtnode.cli import forward as forward_verbs
from dhtnode.cli.common import (
    EXIT_FAILURE,
    EXIT_NO_NETWORK,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    common_args,
    config_from_args,
    emit,
    emit_error,
    net_args,
    run_async,
    setup_logging,
)
from dhtnode.errors import ConfigError, DhtnodeError
from dhtnode.wire.address import format_addr


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
    common_args(p)
    net_args(p)
    p.add_argument("--port", type=int, help="UDP port for DHT, STUN and (later) QUIC")
    p.add_argument("--bootstrap-node", action="store_true", default=None,
                   help="first node of a network on a public address: serve at once")
    p.add_argument("--public-host", help="public IP to advertise with --bootstrap-node")

    p = sub.add_parser("status", help="ask the running daemon for its state")
    common_args(p)
    p.add_argument("--json", action="store_true", help="one JSON object")

    p = sub.add_parser("announce", help="announce a topic from a short-lived node")
    common_args(p, log_default="warning")
    net_args(p)
    _topic_args(p)
    p.add_argument("--keep-alive", type=float, default=0.0, metavar="SECONDS",
                   help="stay up this long, refreshing the record, then withdraw it")
    p.add_argument("--via-daemon", action="store_true",
                   help="ask the running daemon to announce (it keeps refreshing it)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("unannounce", help="withdraw a topic announcement")
    common_args(p, log_default="warning")
    net_args(p)
    _topic_args(p)
    p.add_argument("--via-daemon", action="store_true")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("lookup", help="find the records announced for a topic")
    common_args(p, log_default="warning")
    net_args(p)
    _topic_args(p)
    p.add_argument("--via-daemon", action="store_true", help="look up through the running daemon")
    p.add_argument("--json", action="store_true", help="one JSON object per record")

    p = sub.add_parser("ping", help="ping a DHT node (HOST:PORT) or a listener (PUBKEY)")
    common_args(p, log_default="warning")
    net_args(p)
    p.add_argument("address", metavar="TARGET",
                   help="HOST:PORT: a DHT ping; a 64-hex public key: connect and echo")
    p.add_argument("--via-daemon", action="store_true",
                   help="ping a key through the running daemon")
    p.add_argument("--json", action="store_true")

    connect_verbs.add_parsers(sub)
    forward_verbs.add_parsers(sub)

    p = sub.add_parser("stun", help="ask a STUN server (any dhtnode) for our public address")
    common_args(p, log_default="warning")
    p.add_argument("address", metavar="HOST:PORT")
    p.add_argument("--timeout", type=float, default=1.0, help="seconds per attempt")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("keygen", help="create the identity key (never overwrites one)")
    common_args(p, log_default="warning")
    p.add_argument("--out", type=Path, help="key file (default: <state dir>/identity.key)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("topic", help="print the topic key derived from a name")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    return parser


# --------------------------------------------------------------------------- helpers


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


# --------------------------------------------------------------------------- verbs


def cmd_run(args: argparse.Namespace) -> int:
    from dhtnode.daemon.service import Daemon

    cfg = config_from_args(args)
    setup_logging(cfg)

    async def main() -> int:
        d = Daemon(cfg)
        await d.start()
        await d.run_forever()
        return EXIT_OK

    return run_async(main())


def _control_path(args: argparse.Namespace) -> Path:
    cfg = config_from_args(args)
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
            f"connections:    {len(st.get('connections', []))}",
            f"uptime:         {st['uptime']} s",
        ]
    )
    emit(st, args.json, text)
    return EXIT_OK


def cmd_announce(args: argparse.Namespace) -> int:
    topic = _topic(args)
    if args.keep_alive < 0:
        raise UsageError(f"--keep-alive: must be >= 0 seconds, got {args.keep_alive}")
    if args.via_daemon:
        from dhtnode.daemon import control

        res = asyncio.run(control.request(_control_path(args), "announce", topic=topic.hex()))
        emit(res, args.json, f"announced {topic.hex()} on {res['stored_on']} nodes (daemon)")
        return EXIT_OK if res["stored_on"] else EXIT_FAILURE
    cfg = config_from_args(args)
    setup_logging(cfg)

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
            emit(
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

    return run_async(main())


def _emit_unannounced(args: argparse.Namespace, topic: bytes, gone: int) -> None:
    emit({"event": "unannounced", "topic": topic.hex(), "withdrawn_from": gone},
          args.json, f"withdrew {topic.hex()} from {gone} nodes")


def cmd_unannounce(args: argparse.Namespace) -> int:
    topic = _topic(args)
    if args.via_daemon:
        from dhtnode.daemon import control

        res = asyncio.run(control.request(_control_path(args), "unannounce", topic=topic.hex()))
        emit(res, args.json, f"withdrew {topic.hex()} from {res['withdrawn_from']} nodes")
        return EXIT_OK
    cfg = config_from_args(args)
    setup_logging(cfg)

    async def main() -> int:
        from dhtnode.crypto.identity import load_or_create_identity
        from dhtnode.daemon.service import client_node, identity_path, resolve

        ident, _ = load_or_create_identity(identity_path(cfg.node.state_dir))
        seeds = await resolve(cfg.node.bootstrap) if args.bootstrap else None
        async with client_node(cfg, identity=ident, bootstrap=seeds) as c:
            gone = await c.endpoint.run(lambda n: n.unannounce(topic))
        _emit_unannounced(args, topic, gone)
        return EXIT_OK

    return run_async(main())


def cmd_lookup(args: argparse.Namespace) -> int:
    from dhtnode.daemon.service import record_to_json

    topic = _topic(args)
    records: list[dict[str, Any]]
    if args.via_daemon:
        from dhtnode.daemon import control

        res = asyncio.run(control.request(_control_path(args), "lookup", topic=topic.hex()))
        records = list(res["records"])
    else:
        cfg = config_from_args(args)
        setup_logging(cfg)

        async def main() -> list[dict[str, Any]]:
            from dhtnode.daemon.service import client_node, resolve

            seeds = await resolve(cfg.node.bootstrap) if args.bootstrap else None
            async with client_node(cfg, bootstrap=seeds) as c:
                res = await c.endpoint.run(lambda n: n.lookup(topic))
                return [record_to_json(topic, r) for r in res.records]

        records = asyncio.run(main())
    for r in records:
        addrs = ", ".join(f"{a['kind']} {a['address']}" for a in r["addresses"]) or "-"
        emit(r, args.json, f"{r['public_key']}  seq={r['seq']}  {addrs}")
    if not records and not args.json:
        print(f"no records for {topic.hex()}", file=sys.stderr)
    return EXIT_OK if records else EXIT_FAILURE


def cmd_ping(args: argparse.Namespace) -> int:
    from dhtnode.wire.address import parse_host_port

    if connect_verbs.looks_like_key(args.address):
        return connect_verbs.cmd_ping_key(args)

    try:
        host, port = parse_host_port(args.address)
    except ValueError as exc:
        raise UsageError(f"HOST:PORT: {exc}") from None
    cfg = config_from_args(args)
    setup_logging(cfg)

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
        emit(
            {"address": format_addr(targets[0]), "rtt_ms": round(rtt, 3),
             "node_id": resp.id.hex() if resp.id else None, "seen_as": seen},
            args.json,
            f"{args.address}: rtt {rtt:.2f} ms, node id {resp.id.hex() if resp.id else '(client)'}"
            f", sees us as {seen}",
        )
        return EXIT_OK

    return run_async(main())


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
        emit({"server": args.address, "mapped_address": format_addr(mapped)},
              args.json, f"mapped address: {mapped[0]}:{mapped[1]}")
        return EXIT_OK

    return asyncio.run(main())


def cmd_keygen(args: argparse.Namespace) -> int:
    from dhtnode.crypto.identity import load_or_create_identity
    from dhtnode.daemon.service import identity_path
    from dhtnode.daemon.state import ensure_state_dir

    cfg = config_from_args(args)
    if args.out is None:
        ensure_state_dir(cfg.node.state_dir)
    path = args.out or identity_path(cfg.node.state_dir)
    ident, created = load_or_create_identity(path)
    emit({"path": str(path), "public_key": ident.public_key.hex(), "created": created},
          args.json,
          f"{'created' if created else 'existing key kept'}: {path}\npublic key: "
          f"{ident.public_key.hex()}")
    return EXIT_OK


def cmd_topic(args: argparse.Namespace) -> int:
    from dhtnode.dht.ids import topic_from_name

    t = topic_from_name(args.name).hex()
    emit({"name": args.name, "topic": t}, args.json, t)
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
    "listen": connect_verbs.cmd_listen,
    "connect": connect_verbs.cmd_connect,
    "join": connect_verbs.cmd_join,
    "expose": forward_verbs.cmd_expose,
    "forward": forward_verbs.cmd_forward,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    as_json = bool(getattr(args, "json", False))
    try:
        return VERBS[args.verb](args)
    except (ConfigError, UsageError) as exc:
        emit_error("usage", str(exc), as_json, args.verb)
        return EXIT_USAGE
    except DhtnodeError as exc:
        code = str(getattr(exc, "code", "failed"))
        emit_error(code, str(exc), as_json, args.verb)
        return EXIT_NO_NETWORK if code == "no_network" else EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE
