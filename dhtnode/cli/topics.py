"""The topic verbs: ``announce``, ``unannounce`` and ``lookup``, through the running daemon
when one answers on the state dir (a one-shot node with ``--bootstrap`` or ``--one-shot``).
Argument parsing lives in ``main.py``; no protocol logic here.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from dhtnode.cli.common import (
    EXIT_FAILURE,
    EXIT_OK,
    NotAnnounced,
    NotFound,
    UsageError,
    config_from_args,
    control_path,
    daemon_answers,
    emit,
    run_async,
    setup_logging,
)
from dhtnode.dht.op import NoAnswer
from dhtnode.errors import DhtnodeError
from dhtnode.wire.address import format_addr


def _control_path(args: argparse.Namespace) -> Path:
    return control_path(args)


def topic_arg(args: argparse.Namespace) -> bytes:
    """The topic of TOPIC or --topic-name (exactly one), as a usage error otherwise."""
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


def _use_daemon(args: argparse.Namespace) -> bool:
    """``--via-daemon``; or by default (as ``tailscale`` or ``ipfs`` do) when a daemon answers
    and neither ``--one-shot`` nor ``--bootstrap`` asks for a short-lived node."""
    if args.via_daemon:
        return True
    if args.one_shot or args.bootstrap:
        return False
    return daemon_answers(_control_path(args))


def _refuse_daemons_key(args: argparse.Namespace, cfg: Any, verb: str) -> None:
    """A one-shot node on the daemon's state dir signs with the daemon's key and a newer
    seq: its record would replace the daemon's live one."""
    if daemon_answers(Path(cfg.control_socket_path)):
        raise UsageError(
            f"a daemon runs on {cfg.node.state_dir} with the same key: a one-shot {verb} "
            "would replace its live record. Leave out --one-shot/--bootstrap (or give "
            "--via-daemon) to go through the daemon, or use another --state-dir"
        )


# --------------------------------------------------------------------------- verbs


def cmd_announce(args: argparse.Namespace) -> int:
    topic = topic_arg(args)
    if args.keep_alive is not None and args.keep_alive <= 0:
        raise UsageError(f"--keep-alive: must be > 0 seconds, got {args.keep_alive}")
    if args.via_daemon and args.keep_alive is not None:
        raise UsageError("--keep-alive is for a one-shot node; the daemon keeps its "
                         "announcements refreshed until `unannounce`")
    # --keep-alive asks for a one-shot node, like --one-shot.
    if args.via_daemon or (args.keep_alive is None and _use_daemon(args)):
        from dhtnode.daemon import control

        res = asyncio.run(control.request(_control_path(args), "announce", topic=topic.hex()))
        emit(_announced_obj(topic, res["public_key"], res["stored_on"], res["public_address"],
                            0.0, via_daemon=True),
             args.json, f"announced {topic.hex()} on {res['stored_on']} nodes (daemon)")
        return EXIT_OK if res["stored_on"] else EXIT_FAILURE
    if args.keep_alive is None:
        raise UsageError(
            "a one-shot announce needs --keep-alive SECONDS: its record points at this "
            "command's own UDP port, which closes when it exits, so without it the record "
            "would send everyone to a dead address for its whole TTL. Run a daemon "
            "(`dhtnode run`) and announce through it, or give --keep-alive"
        )
    cfg = config_from_args(args)
    _refuse_daemons_key(args, cfg, "announce")
    setup_logging(cfg)

    async def main() -> int:
        from dhtnode.crypto.identity import load_or_create_identity
        from dhtnode.daemon.client import client_node
        from dhtnode.daemon.state import ensure_state_dir
        from dhtnode.daemon.wiring import identity_path

        ensure_state_dir(cfg.node.state_dir)
        ident, _ = load_or_create_identity(identity_path(cfg.node.state_dir))
        async with client_node(cfg, identity=ident) as c:
            stored = await c.endpoint.run(lambda n: n.announce(topic))
            pub = c.node.public
            emit(
                _announced_obj(topic, ident.public_key.hex(), stored,
                               format_addr(pub) if pub else None, args.keep_alive,
                               via_daemon=False),
                args.json,
                f"announced {topic.hex()} as {ident.public_key.hex()} on {stored} nodes",
            )
            if not stored:
                return EXIT_FAILURE
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
            _emit_unannounced(args, topic, ident.public_key.hex(), gone, via_daemon=False)
            return EXIT_OK

    return run_async(main())


def _announced_obj(topic: bytes, public_key: str, stored: int, public_address: str | None,
                   keep_alive: float, *, via_daemon: bool) -> dict[str, Any]:
    """``announce --json``: the same keys with or without ``--via-daemon``."""
    return {"event": "announced", "topic": topic.hex(), "public_key": public_key,
            "stored_on": stored, "public_address": public_address, "keep_alive": keep_alive,
            "via_daemon": via_daemon}


def _emit_unannounced(args: argparse.Namespace, topic: bytes, public_key: str, gone: int, *,
                      via_daemon: bool) -> None:
    """``unannounce --json``: the same keys with or without ``--via-daemon``."""
    emit({"event": "unannounced", "topic": topic.hex(), "public_key": public_key,
          "withdrawn_from": gone, "via_daemon": via_daemon},
         args.json, f"withdrew {topic.hex()} from {gone} nodes")


def _not_announced(topic: bytes, public_key: str, where: str) -> NotAnnounced:
    return NotAnnounced(
        f"topic {topic.hex()} is not announced by {public_key} ({where}): nothing to withdraw"
    )


def cmd_unannounce(args: argparse.Namespace) -> int:
    topic = topic_arg(args)
    if _use_daemon(args):
        from dhtnode.daemon import control

        res = asyncio.run(control.request(_control_path(args), "unannounce", topic=topic.hex()))
        if not res.get("was_announced", True):
            raise _not_announced(topic, res["public_key"], "the daemon has no such announcement")
        _emit_unannounced(args, topic, res["public_key"], res["withdrawn_from"], via_daemon=True)
        return EXIT_OK
    cfg = config_from_args(args)
    _refuse_daemons_key(args, cfg, "unannounce")
    setup_logging(cfg)

    async def main() -> int:
        from dhtnode.crypto.identity import load_or_create_identity
        from dhtnode.daemon.client import client_node
        from dhtnode.daemon.wiring import identity_path

        ident, _ = load_or_create_identity(identity_path(cfg.node.state_dir))
        async with client_node(cfg, identity=ident) as c:
            # Withdraw only what exists: a marker for a topic never announced would say
            # "withdrew from 5 nodes" about nothing.
            found = await c.endpoint.run(lambda n: n.lookup(topic))
            if not any(r.public_key == ident.public_key for r in found.records):
                raise _not_announced(topic, ident.public_key.hex(),
                                     "no record of this key on the network")
            gone = await c.endpoint.run(lambda n: n.unannounce(topic))
        _emit_unannounced(args, topic, ident.public_key.hex(), gone, via_daemon=False)
        return EXIT_OK

    return run_async(main())


def cmd_lookup(args: argparse.Namespace) -> int:
    from dhtnode.daemon.service import record_to_json

    topic = topic_arg(args)
    records: list[dict[str, Any]]
    if _use_daemon(args):
        from dhtnode.daemon import control

        res = asyncio.run(control.request(_control_path(args), "lookup", topic=topic.hex()))
        records = list(res["records"])
        if not records and res.get("responses", 1) == 0:
            raise NoAnswer("nothing answered: the daemon's lookup got no reply (its routing "
                           "table may be empty; see `dhtnode status`)")
    else:
        cfg = config_from_args(args)
        setup_logging(cfg)

        async def main() -> list[dict[str, Any]]:
            from dhtnode.daemon.client import client_node

            async with client_node(cfg) as c:
                res = await c.endpoint.run(lambda n: n.lookup(topic))
                if not res.records and res.responses == 0:
                    raise NoAnswer("nothing answered: no DHT node replied to the lookup")
                return [record_to_json(topic, r) for r in res.records]

        records = asyncio.run(main())
    if not records:
        raise NotFound(f"no records for {topic.hex()}: the network answered, but nobody "
                       "announces this topic")
    for r in records:
        addrs = ", ".join(f"{a['kind']} {a['address']}" for a in r["addresses"]) or "-"
        emit(r, args.json, f"{r['public_key']}  seq={r['seq']}  {addrs}")
    return EXIT_OK
