"""Port forwarding verbs: ``expose`` (serve a local TCP service under a key) and ``forward``
(a local TCP port that reaches a key's exposed service). Bytes move in
``dhtnode.transport.forward``; this file parses, prints and waits for a signal.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dhtnode.cli.common import (
    EXIT_OK,
    UsageError,
    common_args,
    config_from_args,
    emit,
    net_args,
    run_async,
    setup_logging,
)
from dhtnode.cli.connect import parse_key, wait_for_signal


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("expose", help="serve a local TCP service to holders of allowed keys")
    common_args(p, log_default="warning")
    net_args(p)
    p.add_argument("target", metavar="HOST:PORT", help="the local TCP service, e.g. 127.0.0.1:22")
    p.add_argument("--key-file", type=Path,
                   help="key to serve (default: one key file per service in the state dir)")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--allow", action="append", metavar="PUBKEY", default=None,
                     help="client keys allowed to connect (repeatable)")
    who.add_argument("--public", action="store_true",
                     help="let anyone who knows the key connect (a key is no secret)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("forward", help="a local TCP port that reaches an exposed key")
    common_args(p, log_default="warning")
    net_args(p)
    p.add_argument("public_key", metavar="PUBKEY")
    p.add_argument("--listen", required=True, metavar="HOST:PORT",
                   help="local TCP address to accept connections on, e.g. 127.0.0.1:2222")
    p.add_argument("--key-file", type=Path, help="our key (default: a fresh one)")
    p.add_argument("--json", action="store_true")


def _log_event(name: str, fields: dict[str, Any]) -> None:
    """Forwarding events (``forward_connected``, ``forward_failed``, ``expose_connect_failed``,
    ``expose_stream_refused``) as log lines on stderr, as the daemon logs them."""
    import structlog

    structlog.get_logger("dhtnode").info(name, **fields)


def _host_port(text: str, what: str) -> tuple[str, int]:
    from dhtnode.wire.address import parse_host_port

    try:
        return parse_host_port(text)
    except ValueError as exc:
        raise UsageError(f"{what}: {exc}") from None


def cmd_expose(args: argparse.Namespace) -> int:
    target = _host_port(args.target, "HOST:PORT")
    if not args.allow and not args.public:
        raise UsageError(
            "expose needs --allow PUBKEY (repeatable) or --public: a public key is no secret "
            "(every node storing the record sees it), so without an allow-list anyone could "
            "reach the service"
        )
    allow = {parse_key(k, "--allow") for k in args.allow or ()}
    cfg = config_from_args(args)
    setup_logging(cfg)

    async def main() -> int:
        from dhtnode.crypto.identity import load_or_create_identity
        from dhtnode.daemon.client import client_node
        from dhtnode.daemon.state import ensure_state_dir, service_key_path
        from dhtnode.transport.forward import Exposer

        if args.key_file is None:
            ensure_state_dir(cfg.node.state_dir)
        key_path = args.key_file or service_key_path(cfg.node.state_dir, target)
        ident, _ = load_or_create_identity(key_path)
        async with client_node(cfg) as c:
            exposer = Exposer(c.connections, ident, target,
                              allow=(lambda k: k in allow) if allow else None,
                              on_event=_log_event)
            await exposer.start()
            emit({"public_key": ident.public_key.hex(), "listening": True,
                  "target": args.target, "key_file": str(key_path)},
                 args.json, ident.public_key.hex())
            try:
                await wait_for_signal()
            finally:
                await exposer.close()
        return EXIT_OK

    return run_async(main())


def cmd_forward(args: argparse.Namespace) -> int:
    key = parse_key(args.public_key, "PUBKEY")
    listen = _host_port(args.listen, "--listen")
    cfg = config_from_args(args)
    setup_logging(cfg)

    async def main() -> int:
        from dhtnode.crypto.identity import load_or_create_identity
        from dhtnode.daemon.client import client_node
        from dhtnode.transport.forward import Forwarder

        ident = load_or_create_identity(args.key_file)[0] if args.key_file else None
        async with client_node(cfg) as c:
            fwd = Forwarder(c.connections, key, listen, identity=ident,
                            on_event=_log_event)
            bound = await fwd.start()
            emit({"public_key": key.hex(), "listen": f"{bound[0]}:{bound[1]}",
                  "forwarding": True}, args.json, f"forwarding {bound[0]}:{bound[1]} -> "
                 f"{key.hex()}")
            try:
                await wait_for_signal()
            finally:
                await fwd.close()
        return EXIT_OK

    return run_async(main())
