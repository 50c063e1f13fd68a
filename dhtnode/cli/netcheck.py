"""``dhtnode netcheck``: what this network position means for dhtnode, in the spirit of
``tailscale netcheck``.

A throwaway node (fresh key, one UDP socket, any port) pings the bootstrap nodes (their round
trip times) and a few more DHT nodes, and reads how each saw it: the public address per family
and the NAT's *mapping* behaviour in RFC 4787 terms (the same public port towards every
destination: endpoint-independent; another one per destination: address- or
address-and-port-dependent, told apart only when two answering nodes share an IP). Then it
waits a few seconds for the DHT's own reachability check (CHECK_REACHABLE: other nodes have a
stranger send a PROBE to us): a probe that arrives from an address we never sent to proves the
port reachable and the *filtering* endpoint-independent; probes sent and none arriving mean
address-dependent filtering or stricter (the protocol has no probe from a known IP on another
port, so the two stricter kinds are not told apart). Where nothing was measured it says
"unknown" rather than guess.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import time
from typing import TYPE_CHECKING, Any

from dhtnode.cli.common import (
    EXIT_NO_NETWORK,
    EXIT_OK,
    common_args,
    config_from_args,
    emit,
    net_args,
    run_async,
    setup_logging,
)
from dhtnode.errors import DhtnodeError
from dhtnode.nat.behaviour import (
    ADDRESS_AND_PORT_DEPENDENT,
    ADDRESS_DEPENDENT,
    ENDPOINT_DEPENDENT,
    ENDPOINT_INDEPENDENT,
    FILTERING_STRICT,
    MAPPING_NONE,
    UNKNOWN,
    VARYING_MAPPINGS,
)
from dhtnode.wire.address import Address, format_addr

if TYPE_CHECKING:
    from dhtnode.dht.node import DhtNode

#: DHT nodes besides the bootstrap nodes asked how they see us.
EXTRA_PINGS = 6
#: Seconds to wait for the reachability check's verdict by default.
DEFAULT_WAIT = 8.0

# Short names for the shared RFC 4787 words (nat/behaviour.py), which `status` uses too.
NONE = MAPPING_NONE
EIM = ENDPOINT_INDEPENDENT
ADM = ADDRESS_DEPENDENT
APDM = ADDRESS_AND_PORT_DEPENDENT
EDM = ENDPOINT_DEPENDENT


def add_parser(sub: Any) -> None:
    p = sub.add_parser("netcheck", help="report public addresses, NAT behaviour, reachability "
                       "and bootstrap round trips")
    common_args(p, log_default="warning")
    net_args(p)
    p.add_argument("--wait", type=float, default=DEFAULT_WAIT, metavar="SECONDS",
                   help=f"how long to wait for the reachability check (default {DEFAULT_WAIT})")
    p.add_argument("--json", action="store_true", help="one JSON object")


def _family(addr: Address) -> str:
    return "ipv6" if ":" in addr[0] else "ipv4"


def _route_source(remote: Address) -> str | None:
    """The local IP the kernel sends from towards ``remote`` (no datagram is sent)."""
    fam = socket.AF_INET6 if ":" in remote[0] else socket.AF_INET
    try:
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            s.connect(remote)
            return str(s.getsockname()[0])
    except OSError:
        return None


def classify_mapping(samples: list[tuple[Address, Address]], local_port: int) -> str:
    """RFC 4787 mapping behaviour from (node asked, address it saw us as) pairs of one family,
    all sent from one local port."""
    if not samples:
        return UNKNOWN
    mapped = {m for _, m in samples}
    if len(mapped) == 1:
        only = next(iter(mapped))
        remote = samples[0][0]
        if only[1] == local_port and _route_source(remote) == only[0]:
            return NONE  # they see our own address and port: no NAT on the way
        return EIM if len({r for r, _ in samples}) >= 2 else UNKNOWN
    by_ip: dict[str, set[tuple[int, Address]]] = {}
    for r, m in samples:
        by_ip.setdefault(r[0], set()).add((r[1], m))
    for seen in by_ip.values():
        ports = {p for p, _ in seen}
        if len(ports) >= 2 and len({m for _, m in seen}) >= 2:
            return APDM  # same IP, another port, another mapping
    if any(len({p for p, _ in seen}) >= 2 for seen in by_ip.values()):
        return ADM  # same IP, other ports: same mapping; other IPs: another one
    return EDM


def verdict(result: dict[str, Any]) -> str:
    mappings = set(result["nat_mapping"].values())
    reachable = result["reachable"]
    if not result["public_addresses"]:
        return ("no DHT node answered: UDP is blocked here or the bootstrap nodes are down; "
                "nothing works until one answers")
    if reachable and mappings <= {NONE}:
        return "public address, reachable: this node serves the DHT; peers connect directly"
    if reachable:
        return ("behind a NAT that lets strangers in (port forwarded or full cone): this node "
                "serves the DHT; peers connect directly")
    if mappings & VARYING_MAPPINGS:
        return ("port-randomizing (symmetric) NAT: a client; direct connections to open and "
                "stable-mapping NATs (hole punching with port resampling), relayed otherwise")
    if (EIM in mappings or NONE in mappings) and reachable is False:
        how = "firewall" if mappings <= {NONE} else "filtering NAT"
        return (f"stable mapping behind a {how}: a client, not reachable by strangers; hole "
                "punching connects to most peers, relayed only with port-randomizing ones")
    if EIM in mappings or NONE in mappings:
        return ("stable mapping; reachability not measured (no stranger's probe could be "
                "arranged in time: a small network, or try a longer --wait): hole punching "
                "connects to most peers, relayed only with port-randomizing ones")
    return ("too few DHT nodes answered to tell the NAT's behaviour: pass more --bootstrap "
            "nodes")


def _ignore_known_ips(node: DhtNode, seeds: list[Address]) -> None:
    """The DHT judges reachability per address: a probe from an IP we sent to, but from
    another port, proves it reachable. An address-dependent filter lets that one in, so for
    telling filtering kinds apart the engine is told to ignore probes (and requests) from the
    IPs of the seeds and of our contacts; it counts them ("probe_ignored", "request_ignored")
    and calls a check with such a probe inconclusive."""

    def known(source: Address) -> bool:
        return source[0] in {a[0] for a in seeds} | {c.addr[0] for c in node.table}

    node.ignore_probes_from(known)


async def netcheck(seeds: list[Address], *, params: Any, host: str = "::",
                   wait: float = DEFAULT_WAIT) -> dict[str, Any]:
    """Run the checks from a throwaway node bound to ``host`` (any port); the report dict."""
    from dhtnode.crypto.identity import Identity
    from dhtnode.dht.node import DhtNode
    from dhtnode.dht.op import Op
    from dhtnode.transport.udp import NodeEndpoint, open_udp_socket
    from dhtnode.wire import messages

    node = DhtNode(Identity.generate(), params, now=time.monotonic(), wall=time.time,
                   seeds=seeds)
    _ignore_known_ips(node, seeds)
    ep = await NodeEndpoint.create_on(open_udp_socket(host, 0), node)
    local_port = ep.local_address[1]
    samples: list[tuple[Address, Address]] = []

    async def ping(addr: Address) -> float | None:
        t0 = time.monotonic()
        try:
            resp = await ep.run(lambda n: n.ping(addr))
        except DhtnodeError:
            return None
        rtt = (time.monotonic() - t0) * 1000
        samples.append((addr, resp.to))
        return round(rtt, 3)

    try:
        rtts = await asyncio.gather(*(ping(a) for a in seeds))
        bootstrap_rtt = {format_addr(a): r for a, r in zip(seeds, rtts, strict=True)}
        answered = [a for a, r in zip(seeds, rtts, strict=True) if r is not None]
        if len({a[0] for a in answered}) >= 2:
            # Enough to tell the mapping. No join: every node we send to is one whose probe
            # proves nothing about filtering, and a join's lookup talks to dozens. The
            # reachability check asks the seeds (now in the table), whose helpers are
            # strangers to us.
            def start_checks(n: DhtNode) -> Op[messages.Response]:
                n.start_checks()
                return n.ping(answered[0])  # and the endpoint arms the check's timer

            with contextlib.suppress(DhtnodeError):
                await ep.run(start_checks)
        elif answered:
            with contextlib.suppress(DhtnodeError):
                await ep.run(lambda n: n.bootstrap())
            reserve = node.reserved_helpers
            others = [c.addr for c in node.table if c.addr not in seeds
                      and c.addr not in reserve][:EXTRA_PINGS]
            await asyncio.gather(*(ping(a) for a in others))
        families: dict[str, list[tuple[Address, Address]]] = {}
        for r, m in samples:
            families.setdefault(_family(r), []).append((r, m))
        mapping = {f: classify_mapping(s, local_port) for f, s in sorted(families.items())}
        public = {f: sorted({format_addr(m) for _, m in s}) for f, s in sorted(families.items())}
        # The reachability check: not run behind a port-randomizing NAT (it cannot serve). Its
        # verdict is read from the engine's status, in the words `status` prints: endpoint-
        # independent filtering once a stranger got in, stricter once probes did not.
        deadline = time.monotonic() + (wait if samples else 0.0)
        reachable: bool | None = None
        while True:
            filtering = node.status()["nat_filtering"]
            if filtering == FILTERING_STRICT and node.stats["probe_ignored"]:
                # A probe from an IP we know got in and was set aside: a check that failed
                # meanwhile proves nothing (the engine calls a solicited probe inconclusive;
                # it never saw this one). Wait on for a stranger's probe.
                filtering = UNKNOWN
            if filtering == ENDPOINT_INDEPENDENT:
                reachable = True
                break
            if filtering == FILTERING_STRICT:
                reachable = False
                break
            if set(mapping.values()) & VARYING_MAPPINGS:
                # A new port per destination: the announced one is useless. Filtering stays
                # as measured (unknown): this "no" says nothing about it.
                reachable = False
                break
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.1)
        result: dict[str, Any] = {
            "ok": bool(samples),
            "public_addresses": public,
            "nat_mapping": mapping,
            "nat_filtering": filtering,
            "reachable": reachable,
            "bootstrap_rtt_ms": bootstrap_rtt,
            "local_port": local_port,
            "stats": {**dict(sorted(node.stats.items())),
                      # The name this count had before the engine kept it; scripts read it.
                      "probe_from_known_ip_ignored": node.stats["probe_ignored"]},
        }
        result["verdict"] = verdict(result)
        return result
    finally:
        ep.close()


def cmd_netcheck(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    setup_logging(cfg)
    if args.wait < 0:
        from dhtnode.cli.common import UsageError

        raise UsageError(f"--wait: must be >= 0 seconds, got {args.wait}")

    async def main() -> int:
        from dhtnode.daemon.service import params_from_config, resolve
        from dhtnode.daemon.state import load_node_cache

        seeds = await resolve(cfg.node.bootstrap)
        if not seeds:
            with contextlib.suppress(DhtnodeError):
                seeds = load_node_cache(cfg.node.state_dir)[:8]
        if not seeds:
            raise DhtnodeError("no bootstrap node: pass --bootstrap HOST:PORT (repeatable) or set "
                               "node.bootstrap in the config")
        host = cfg.node.host if cfg.node.host not in ("",) else "::"
        res = await netcheck(seeds, params=params_from_config(cfg), host=host, wait=args.wait)
        lines = [
            *(f"public {f}:  {', '.join(a)}" for f, a in res["public_addresses"].items()),
            *(f"NAT mapping ({f}): {m}" for f, m in res["nat_mapping"].items()),
            f"NAT filtering:  {res['nat_filtering']}",
            "reachable:      " + {True: "yes", False: "no", None: "unknown"}[res["reachable"]],
            *(f"bootstrap {a}: " + (f"{ms} ms" if ms is not None else "no answer")
              for a, ms in res["bootstrap_rtt_ms"].items()),
            f"verdict: {res['verdict']}",
        ]
        emit(res, args.json, "\n".join(lines))
        return EXIT_OK if res["ok"] else EXIT_NO_NETWORK

    return run_async(main())
