"""What every CLI verb shares: exit codes, common arguments, config, logging and output.

Output: results go to stdout; ``--json`` prints one object per line with stable keys and
``ok`` in every object (errors: ``{"ok": false, "error": CODE, "message": ...}``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from dhtnode.errors import ConfigError, DhtnodeError

T = TypeVar("T")

EXIT_OK = 0
#: Failure: not found, refused, network error.
EXIT_FAILURE = 1
#: Usage error: a bad argument or config value (the message names it).
EXIT_USAGE = 2
#: Nothing answered: no network, or no reachable bootstrap node.
EXIT_NO_NETWORK = 3


class UsageError(DhtnodeError):
    """A command-line argument is invalid (exit code 2)."""


class NotFound(DhtnodeError):
    """The network answered, but has nothing for the request (exit code 1)."""

    code = "not_found"


class NotAnnounced(DhtnodeError):
    """An ``unannounce`` of a topic this key has no record for (exit code 1)."""

    code = "not_announced"


#: Every ``error`` code a ``--json`` error object can carry (see docs/API.md):
#: usage (exit 2), no_network (exit 3: nothing answered), and exit 1 for the rest.
ERROR_CODES = (
    "usage", "no_network", "not_found", "not_announced", "failed", "no_daemon",
    "permission_denied", "peer_not_found", "refused", "introduction_failed", "punch_failed",
)


def common_args(p: argparse.ArgumentParser, *, log_default: str | None = None) -> None:
    p.add_argument("--config", type=Path, help="TOML config file (see config.example.toml)")
    p.add_argument("--state-dir", type=Path, help="directory for the identity key and node cache")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                   default=log_default, help="log verbosity (logs go to stderr)")
    p.add_argument("--log-format", choices=["auto", "json", "console"],
                   help="auto = JSON lines unless stderr is a terminal")
    p.add_argument("--control", type=Path, metavar="PATH",
                   help="the daemon's control socket (default: the state dir's, else the "
                   f"system service's {SYSTEM_CONTROL_SOCKET})")


#: The control socket of the systemd service (deploy/systemd/dhtnode.service).
SYSTEM_CONTROL_SOCKET = Path("/run/dhtnode/control.sock")


def control_path(args: argparse.Namespace) -> Path:
    """The control socket a verb talks to: ``--control``; else the configured one (``[control]
    socket``, or the state dir's); but when neither --state-dir nor --config was given and no
    daemon of the user's own answers, the system service's (:data:`SYSTEM_CONTROL_SOCKET`) if
    it exists."""
    explicit = getattr(args, "control", None)
    if explicit is not None:
        return Path(explicit).expanduser()
    own = Path(config_from_args(args).control_socket_path)
    if args.state_dir is not None or args.config is not None:
        return own
    if daemon_answers(own) or not os.path.lexists(SYSTEM_CONTROL_SOCKET):
        return own
    return SYSTEM_CONTROL_SOCKET


def daemon_answers(path: Path) -> bool:
    """Does a daemon accept connections on the control socket at ``path``?"""
    import socket

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
        return True
    except (OSError, ValueError):
        return False
    finally:
        s.close()


def net_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap", action="append", metavar="HOST:PORT", default=None,
                   help="a DHT node to join through (repeatable)")
    p.add_argument("--host", help="local address to bind (default from config)")
    p.add_argument("--network", metavar="NAME",
                   help='the DHT network to join (node.network; default "public"): nodes of '
                   "another network are ignored, so a test swarm never merges with another")


def config_from_args(args: argparse.Namespace) -> Any:
    from dhtnode.daemon.config import apply_overrides, load_config

    cfg = load_config(args.config)
    port = getattr(args, "port", None)
    if port is not None and not 0 <= port <= 65535:
        raise ConfigError("--port", f"must be 0-65535, got {port}")
    return apply_overrides(
        cfg,
        host=getattr(args, "host", None),
        port=port if getattr(args, "verb", "") == "run" else None,
        bootstrap=getattr(args, "bootstrap", None),
        state_dir=args.state_dir,
        bootstrap_node=getattr(args, "bootstrap_node", None),
        public_host=getattr(args, "public_host", None),
        log_level=args.log_level,
        log_format=args.log_format,
        network=getattr(args, "network", None),
    )


def setup_logging(cfg: Any) -> None:
    from dhtnode.daemon.logging import configure_logging

    configure_logging(cfg.log.level, cfg.log.format)


def emit(obj: dict[str, Any], as_json: bool, text: str, *, err: bool = False) -> None:
    """One result: a JSON line with ``ok``, or text; on stdout, or on stderr with ``err``
    (where stdout carries a stream's bytes, as in ``connect``)."""
    out = sys.stderr if err else sys.stdout
    if as_json:
        line = json.dumps({"ok": True, **obj}, separators=(",", ":"), sort_keys=True)
        print(line, file=out, flush=True)
    else:
        print(text, file=out, flush=True)


def emit_json_error(code: str, message: str) -> None:
    """The ``--json`` error object, on stdout."""
    print(json.dumps({"ok": False, "error": code, "message": message},
                     separators=(",", ":"), sort_keys=True), flush=True)


def emit_error(code: str, message: str, as_json: bool, verb: str) -> None:
    if as_json:
        emit_json_error(code, message)
    print(f"dhtnode {verb}: {'error: ' if code == 'usage' else ''}{message}", file=sys.stderr)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(coro)
