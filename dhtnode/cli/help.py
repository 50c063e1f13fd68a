"""Each command's ``--help`` page: a description and examples, kept in one place.

``apply`` adds them to the subparsers after they are built; a verb's own description (if its
module gives one) is kept. A test checks that every verb has both.
"""

from __future__ import annotations

import argparse
import textwrap
from typing import Any

#: verb -> (what it does, in a sentence or two; examples, one command per line).
PAGES: dict[str, tuple[str, str]] = {
    "run": (
        "Run the long-lived node (the daemon): joins the DHT, serves once reachable, keeps "
        "announcements alive and answers `dhtnode status` on its control socket.",
        "dhtnode run --bootstrap 203.0.113.7:49200\n"
        "dhtnode run --bootstrap-node --public-host 203.0.113.7   # first node, on a VPS",
    ),
    "status": (
        "Ask the running daemon (on --state-dir) for its state: addresses, NAT class, "
        "routing table, records and counters.",
        "dhtnode status\ndhtnode status --json | jq .routing_table_size",
    ),
    "peers": (
        "List the daemon's routing table: node id, address, seconds since last seen, round "
        "trip time (once measured).",
        "dhtnode peers\ndhtnode peers --json | jq -r .address",
    ),
    "id": (
        "Print this node's public key (the identity key in the state dir) and, if a daemon "
        "runs there, its DHT node id.",
        "dhtnode id\ndhtnode id --json",
    ),
    "announce": (
        "Announce that this key serves a topic: a signed record on the nodes closest to it. "
        "Through the daemon when one runs on the state dir (it keeps the record refreshed, "
        "across restarts too); else a short-lived node that stays up for --keep-alive.",
        "dhtnode announce --topic-name my-app\n"
        "dhtnode announce --topic-name my-app --bootstrap 203.0.113.7:49200 --keep-alive 600",
    ),
    "unannounce": (
        "Withdraw this key's record for a topic. A topic this key never announced is an "
        "error (not_announced), not a silent success.",
        "dhtnode unannounce --topic-name my-app --via-daemon",
    ),
    "lookup": (
        "Find the records announced for a topic. Exit 1 (not_found): the network answered "
        "but nobody announces it; exit 3 (no_network): nothing answered.",
        "dhtnode lookup --topic-name my-app --bootstrap 203.0.113.7:49200\n"
        "dhtnode lookup --topic-name my-app --via-daemon --json",
    ),
    "ping": (
        "Ping a DHT node by HOST:PORT (a DHT round trip), or a listener by its public key "
        "(connect and echo).",
        "dhtnode ping 203.0.113.7:49200\ndhtnode ping 5f3c...64 hex... --via-daemon",
    ),
    "stun": (
        "Ask a STUN server (any dhtnode) which address it sees us at. --timeout bounds the "
        "whole wait, retransmissions included.",
        "dhtnode stun 203.0.113.7:49200 --timeout 2",
    ),
    "keygen": (
        "Create the identity key (never overwrites one). With --out the directory must exist.",
        "dhtnode keygen\ndhtnode keygen --out ./service.key --json",
    ),
    "topic": (
        "Print the topic key (64 hex characters) derived from a name.",
        "dhtnode topic my-app",
    ),
    "listen": (
        "Serve a public key: accept encrypted connections to it, from anywhere the DHT "
        "reaches (hole punching, or a relay).",
        "dhtnode listen --echo --bootstrap 203.0.113.7:49200",
    ),
    "join": (
        "Join a topic: announce it and connect to everyone else who joins it.",
        "dhtnode join --topic-name my-swarm --echo --bootstrap 203.0.113.7:49200",
    ),
    "connect": (
        "Connect to a public key and pipe stdin/stdout over one stream.",
        "echo hello | dhtnode connect PUBKEY --bootstrap 203.0.113.7:49200",
    ),
    "expose": (
        "Serve a local TCP service under its own key to the client keys allowed.",
        "dhtnode expose 127.0.0.1:22 --allow CLIENT_PUBKEY --bootstrap 203.0.113.7:49200",
    ),
    "forward": (
        "Accept local TCP connections and carry each to a key's exposed service.",
        "dhtnode forward SERVICE_PUBKEY --listen 127.0.0.1:2222 --bootstrap "
        "203.0.113.7:49200\nssh -p 2222 localhost",
    ),
    "netcheck": (
        "Report this host's public addresses, NAT behaviour, reachability and the round "
        "trips to the bootstrap nodes.",
        "dhtnode netcheck --bootstrap 203.0.113.7:49200",
    ),
}


def apply(sub: Any) -> None:
    """Give every subparser in ``sub`` its description and examples."""
    for verb, p in sub.choices.items():
        page = PAGES.get(verb)
        if page is None:
            continue
        description, examples = page
        if not p.description:
            p.description = textwrap.fill(description, 79)
        if not p.epilog:
            p.epilog = "examples:\n" + "\n".join(f"  {line}" for line in examples.splitlines())
        p.formatter_class = argparse.RawDescriptionHelpFormatter
