"""The ``dhtnode`` command line: argument parsing, output formatting, exit codes.

Exit codes: 0 ok, 1 failure (nothing found, refused), 2 usage error (bad argument or config;
the message names the field and what is allowed), 3 nothing answered (no network). Results go
to stdout (``--json``: one object per line, the keys of docs/JSON.md; errors too); logs go to
stderr.

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
from typing import Any, NoReturn

from dhtnode import __version__
from dhtnode.cli import connect as connect_verbs
from dhtnode.cli import forward as forward_verbs
from dhtnode.cli import help as help_pages
from dhtnode.cli import netcheck as netcheck_verb
from dhtnode.cli import topics as topic_verbs
from dhtnode.cli.common import (
    EXIT_FAILURE,
    EXIT_NO_NETWORK,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    common_args,
    config_from_args,
    control_path,
    emit,
    emit_error,
    emit_json_error,
    net_args,
    run_async,
    setup_logging,
)
from dhtnode.errors import ConfigError, DhtnodeError
from dhtnode.wire.address import format_addr


def _topic_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("topic", nargs="?", help="topic as 64 hex characters")
    p.add_argument("--topic-name", help="derive the topic from a name (BLAKE2b-256)")


class _ArgumentError(Exception):
    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser
        self.message = message


class _ArgumentParser(argparse.ArgumentParser):
    """Raises instead of exiting on a bad argument, so ``main`` can also print the JSON
    error object when ``--json`` was given (subparsers inherit the class)."""

    def error(self, message: str) -> NoReturn:
        raise _ArgumentError(self, message)


def _daemon_args(p: argparse.ArgumentParser, via_help: str) -> None:
    how = p.add_mutually_exclusive_group()
    how.add_argument("--via-daemon", action="store_true",
                     help=f"{via_help} (the default when a daemon answers on the state dir "
                     "and no --bootstrap is given)")
    how.add_argument("--one-shot", action="store_true",
                     help="use a short-lived node of this command's own, even when a daemon "
                     "runs")


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
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
    p.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus metrics on http://HOST:PORT/metrics (e.g. "
                   "127.0.0.1:9464; default: [metrics] listen, off)")

    p = sub.add_parser("status", help="ask the running daemon for its state")
    common_args(p)
    p.add_argument("--json", action="store_true", help="one JSON object")

    p = sub.add_parser("peers", help="list the daemon's routing table")
    common_args(p)
    p.add_argument("--json", action="store_true", help="one JSON object per node")

    p = sub.add_parser("id", help="print this node's public key (and node id)")
    common_args(p)
    p.add_argument("--json", action="store_true", help="one JSON object")

    p = sub.add_parser("announce", help="announce a topic (through the daemon if one runs)")
    common_args(p, log_default="warning")
    net_args(p)
    _topic_args(p)
    p.add_argument("--keep-alive", type=float, default=None, metavar="SECONDS",
                   help="one-shot node: stay up this long, refreshing the record, then "
                   "withdraw it (required: a record for a port that closes is useless)")
    _daemon_args(p, "ask the running daemon to announce (it keeps refreshing it)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("unannounce", help="withdraw a topic announcement")
    common_args(p, log_default="warning")
    net_args(p)
    _topic_args(p)
    _daemon_args(p, "ask the running daemon to withdraw it")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("lookup", help="find the records announced for a topic")
    common_args(p, log_default="warning")
    net_args(p)
    _topic_args(p)
    _daemon_args(p, "look up through the running daemon")
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
    netcheck_verb.add_parser(sub)
    forward_verbs.add_parsers(sub)

    p = sub.add_parser("stun", help="ask a STUN server (any dhtnode) for our public address")
    common_args(p, log_default="warning")
    p.add_argument("address", metavar="HOST:PORT")
    p.add_argument("--timeout", type=float, default=3.0,
                   help="seconds to wait in all, retransmissions included (default 3)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("keygen", help="create the identity key (never overwrites one)")
    common_args(p, log_default="warning")
    p.add_argument("--out", type=Path, help="key file (default: <state dir>/identity.key)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("topic", help="print the topic key derived from a name")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    help_pages.apply(sub)
    return parser


# --------------------------------------------------------------------------- helpers


def cmd_run(args: argparse.Namespace) -> int:
    from dhtnode.daemon.service import Daemon

    def configure() -> Any:  # again on SIGHUP: the file and this command line
        from dataclasses import replace

        from dhtnode.daemon.config import with_metrics

        cfg = with_metrics(config_from_args(args), args.metrics)
        if args.control is not None:
            cfg = replace(cfg, control=replace(cfg.control, socket=args.control.expanduser()))
        return cfg

    cfg = configure()
    setup_logging(cfg)

    async def main() -> int:
        d = Daemon(cfg, reload=configure)
        await d.start()
        await d.run_forever()
        return EXIT_OK

    return run_async(main())


def _control_path(args: argparse.Namespace) -> Path:
    return control_path(args)


def cmd_status(args: argparse.Namespace) -> int:
    from dhtnode.daemon import control
    from dhtnode.nat.behaviour import UNKNOWN

    path = _control_path(args)
    st = asyncio.run(control.request(path, "status"))
    text = "\n".join(
        [
            f"node id:        {st['node_id'] or '(none: client mode)'}",
            f"public key:     {st['public_key']}",
            f"network:        {st.get('network', 'public')}",
            f"bind address:   {st['bind_address']}",
            f"public address: {st['public_address'] or '(not yet known)'}",
            f"NAT class:      {st['nat_class']}",
            # .get: a daemon started before these keys existed still answers status.
            f"NAT mapping:    {st.get('nat_mapping', UNKNOWN)}",
            f"NAT filtering:  {st.get('nat_filtering', UNKNOWN)}",
            f"reachable:      {'yes' if st['reachable'] else 'no'}",
            f"serving:        {'yes' if st['server'] else 'no'}",
            f"routing table:  {st['routing_table_size']} nodes",
            f"records stored: {st['records_stored']} ({st['topics_stored']} topics)",
            f"announced:      {len(st['announced_topics'])} topics",
            f"connections:    {len(st.get('connections', []))}",
            f"uptime:         {st['uptime']} s",
            *(f"warning:        {w}" for w in st.get("warnings", [])),
        ]
    )
    emit(st, args.json, text)
    return EXIT_OK


#: The keys of each ``dhtnode peers --json`` object (besides ``ok``).
PEER_KEYS = ("node_id", "address", "last_seen_s", "rtt_ms", "failures")


def cmd_peers(args: argparse.Namespace) -> int:
    from dhtnode.daemon import control

    res = asyncio.run(control.request(_control_path(args), "nodes"))
    peers = [{k: p.get(k) for k in PEER_KEYS} for p in res.get("peers", [])]
    if not args.json:
        print(f"{'NODE ID':<16}  {'ADDRESS':<40}  {'SEEN':>7}  {'RTT':>9}")
    for p in peers:
        rtt = f"{p['rtt_ms']:.1f} ms" if p["rtt_ms"] is not None else "-"
        emit(p, args.json, f"{p['node_id'][:16]}  {p['address']:<40}  "
                           f"{p['last_seen_s']:>5.0f} s  {rtt:>9}")
    if not peers:
        print("the routing table is empty: no DHT node has answered yet (see `dhtnode "
              "status`)", file=sys.stderr)
    return EXIT_OK


def cmd_id(args: argparse.Namespace) -> int:
    from dhtnode.crypto.identity import load_identity
    from dhtnode.daemon import control
    from dhtnode.daemon.service import identity_path

    cfg = config_from_args(args)
    path = identity_path(cfg.node.state_dir)
    if not path.exists():
        raise DhtnodeError(f"no identity key at {path} yet: `dhtnode keygen` or `dhtnode run` "
                           "creates one (or pass --state-dir)")
    ident = load_identity(path)
    node_id = None
    try:
        node_id = asyncio.run(control.request(cfg.control_socket_path, "status", timeout=2.0))[
            "node_id"]
    except DhtnodeError:
        pass  # no daemon: the key is still ours
    emit({"public_key": ident.public_key.hex(), "key_file": str(path), "node_id": node_id},
         args.json, ident.public_key.hex())
    return EXIT_OK


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
        # 4 sends with doubling waits: 1 + 2 + 4 + 8 = 15 first waits fill --timeout.
        mapped = await stun_query(targets[0], timeout=args.timeout / 15, retries=3)
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
    elif not args.out.expanduser().parent.is_dir():
        raise UsageError(
            f"--out: directory {args.out.expanduser().parent} does not exist; create it first "
            "(mkdir -m 700 DIR): keygen creates no directories"
        )
    path = args.out.expanduser() if args.out else identity_path(cfg.node.state_dir)
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
    "peers": cmd_peers,
    "id": cmd_id,
    "announce": topic_verbs.cmd_announce,
    "unannounce": topic_verbs.cmd_unannounce,
    "lookup": topic_verbs.cmd_lookup,
    "ping": cmd_ping,
    "stun": cmd_stun,
    "keygen": cmd_keygen,
    "topic": cmd_topic,
    "listen": connect_verbs.cmd_listen,
    "connect": connect_verbs.cmd_connect,
    "join": connect_verbs.cmd_join,
    "expose": forward_verbs.cmd_expose,
    "forward": forward_verbs.cmd_forward,
    "netcheck": netcheck_verb.cmd_netcheck,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except _ArgumentError as exc:
        exc.parser.print_usage(sys.stderr)
        verb = next((a for a in argv if a in VERBS), "")
        if "--json" in argv:
            emit_json_error("usage", exc.message)
        print(f"{f'dhtnode {verb}' if verb else 'dhtnode'}: error: {exc.message}",
              file=sys.stderr)
        return EXIT_USAGE
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
