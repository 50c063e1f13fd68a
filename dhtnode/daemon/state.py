"""The state directory: identity key and node cache, so a restart keeps both.

Layout::

    <state dir>/            mode 0700
        identity.key        Ed25519 seed (see dhtnode.crypto.identity), mode 0600
        nodes.json          {"version": 1, "saved_at": <unix s>, "nodes": ["ip:port", ...]}
        topics.json         {"version": 1, "topics": ["<64 hex>", ...]}: announced via the daemon
        control.sock        the daemon's control socket, mode 0600

The node cache is a hint, not a truth: a corrupt one is moved aside to nodes.json.corrupt
(kept for inspection) and the node starts from its bootstrap list.

The directory must be ours and closed to others: one that another user owns, or that group or
others may write to, is refused with the fix (``chmod 700 DIR``, ``chown``). Whoever can write
in it can swap the identity key, plant a symbolic link, or put a file where the control
socket goes.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from dhtnode.daemon.atomic import write_atomic
from dhtnode.errors import StateError
from dhtnode.wire.address import Address, format_addr, parse_host_port

T = TypeVar("T")

IDENTITY_FILE = "identity.key"
NODES_FILE = "nodes.json"
#: Nodes kept in the cache: enough to rejoin even if most of them are gone.
MAX_CACHED_NODES = 256
NODES_FORMAT_VERSION = 1


def service_key_path(state_dir: Path, target: tuple[str, int]) -> Path:
    """The key file of an exposed service: one per service, so two ``expose`` commands (or
    ``[[expose]]`` entries) never replace each other's record."""
    name = re.sub(r"[^A-Za-z0-9.-]", "_", f"{target[0]}-{target[1]}")
    return state_dir / f"expose-{name}.key"


def ensure_state_dir(path: Path) -> Path:
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise StateError(
            f"cannot create state dir {path}: {exc.strerror}; choose another with --state-dir"
        ) from None
    check_private_dir(path, "state dir")
    if not os.access(path, os.W_OK | os.X_OK):
        raise StateError(
            f"state dir {path} is not writable by this user; fix its ownership or choose "
            "another with --state-dir"
        )
    return path


def check_private_dir(path: Path, what: str) -> None:
    """Refuse a directory another user owns or that group or others may write to."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise StateError(f"cannot use {what} {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StateError(f"{what} {path} is not a directory; choose another with --state-dir")
    me = os.geteuid()
    if st.st_uid != me:
        raise StateError(
            f"{what} {path} is owned by uid {st.st_uid}, not by this user (uid {me}), who "
            f"could swap the identity key in it. Fix: chown {me} {path} && chmod 700 {path}, "
            "or choose another with --state-dir"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise StateError(
            f"{what} {path} is writable by group or others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}), who could swap the identity key in it. "
            f"Fix: chmod 700 {path}"
        )


def save_node_cache(state_dir: Path, nodes: list[Address], *, now: float) -> None:
    doc = {
        "version": NODES_FORMAT_VERSION,
        "saved_at": round(now, 3),
        "nodes": [format_addr(a) for a in list(dict.fromkeys(nodes))[:MAX_CACHED_NODES]],
    }
    write_atomic(Path(state_dir) / NODES_FILE, json.dumps(doc, indent=1).encode(), mode=0o600)


#: Topics the daemon announces (through ``announce --via-daemon``), so a restart announces
#: them again: {"version": 1, "topics": ["<64 hex>", ...]}.
TOPICS_FILE = "topics.json"


def save_announced(state_dir: Path, topics: list[bytes]) -> None:
    doc = {"version": NODES_FORMAT_VERSION, "topics": [t.hex() for t in topics]}
    write_atomic(Path(state_dir) / TOPICS_FILE, json.dumps(doc, indent=1).encode(), mode=0o600)


def _load_versioned(state_dir: Path, name: str, what: str,
                    parse: Callable[[dict[str, Any]], list[T]]) -> list[T]:
    """A ``{"version": 1, ...}`` JSON file of the state dir, parsed; a missing or unreadable
    file is empty, and a corrupt one is moved aside to ``<name>.corrupt`` (never trusted,
    never lost)."""
    path = Path(state_dir).expanduser() / name
    try:
        raw = path.read_bytes()
    except OSError:
        return []
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict) or doc.get("version") != NODES_FORMAT_VERSION:
            raise ValueError("unknown format")
        return parse(doc)
    except (ValueError, KeyError, TypeError):
        try:
            os.replace(path, path.with_name(name + ".corrupt"))
        except OSError as exc:
            raise StateError(f"corrupt {what} {path} could not be moved aside: {exc}") from None
        return []


def _parse_topics(doc: dict[str, Any]) -> list[bytes]:
    topics = [bytes.fromhex(str(t)) for t in doc["topics"]]
    if any(len(t) != 32 for t in topics):
        raise ValueError("a topic is not 32 bytes")
    return topics


def load_announced(state_dir: Path) -> list[bytes]:
    """The saved topics; a missing or unreadable file is none (a corrupt one is moved aside
    to topics.json.corrupt, as the node cache is)."""
    return _load_versioned(state_dir, TOPICS_FILE, "topics file", _parse_topics)


def _parse_nodes(doc: dict[str, Any]) -> list[Address]:
    entries = doc["nodes"]
    if not isinstance(entries, list):
        raise ValueError("nodes is not a list")
    return [parse_host_port(str(e)) for e in entries[:MAX_CACHED_NODES]]


def load_node_cache(state_dir: Path) -> list[Address]:
    return _load_versioned(state_dir, NODES_FILE, "node cache", _parse_nodes)
