"""Where a malformed-datagram flood's memory goes: bench_flood.py's flood, in one process.

bench_flood.py floods a real daemon and watches its RSS from outside (issue 6: +9.3 MB at
60 s, levelling at +13 MB at 150 s). This variant builds the daemon's node the way
``Daemon.start`` does (a serving bootstrap node on 127.0.0.1 with the relay, the introducer
and the connection manager plugged in) and hands it bench_flood's payloads through
``NodeEndpoint.datagram_received``, the daemon's own entry point, from source ports that
change every SWAP_EVERY datagrams as the flood's sockets do (``--swap-every`` lower fills the
per-source tables in a shorter run). No datagram leaves the process:
the node's answers go to a socket on 127.0.0.1 nobody reads, bounded by the flood's count.

Every REPORT_S seconds it prints: datagrams fed, the process RSS, tracemalloc's traced total,
and a census of every container reachable from the node, the endpoint and the connection
manager that holds more than CENSUS_MIN entries (attribute path and length); at the end the
top allocation sites that grew since the first report (tracemalloc, by line). That names the
per-source table that fills under the flood, and how many entries it holds at its cap.

Bounded: ``--seconds`` (default 60, at most 150) of feeding, ``--rate`` datagrams/s at most.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench_flood import BATCH, SWAP_EVERY, payloads, rss_kb

from dhtnode.connect.services import plug_in
from dhtnode.crypto.identity import Identity
from dhtnode.daemon.config import load_config
from dhtnode.daemon.wiring import params_from_config
from dhtnode.dht.node import DhtNode
from dhtnode.transport.connections import Connections
from dhtnode.transport.udp import NodeEndpoint, open_udp_socket

HOST = "127.0.0.1"
#: Longest run allowed (the flood must stay bounded in time).
MAX_SECONDS = 150.0
#: Seconds between reports.
REPORT_S = 10.0
#: Containers with more entries than this are listed in the census.
CENSUS_MIN = 500
#: How deep the census walks attributes from the roots.
CENSUS_DEPTH = 5
#: The flood's source ports: the kernel's ephemeral range.
PORTS = range(32768, 61000)
#: Sockets a flood worker keeps (bench_flood.SOCKETS) times its workers (default 4).
SOURCES = 32 * 4


def containers(root: Any, name: str, depth: int, seen: set[int]) -> Iterator[tuple[str, int]]:
    """(path, length) of every dict, set, list, deque or OrderedDict reachable from ``root``
    through attributes, dict values and list items (each object visited once)."""
    if id(root) in seen or depth < 0:
        return
    seen.add(id(root))
    if isinstance(root, (dict, set, frozenset, list, tuple)) or hasattr(root, "maxlen"):
        try:
            n = len(root)
        except TypeError:
            n = 0
        if n > CENSUS_MIN:
            yield name, n
        if isinstance(root, dict):
            for v in list(root.values())[:50]:
                yield from containers(v, f"{name}[..]", depth - 1, seen)
        elif isinstance(root, (list, tuple)):
            for v in list(root)[:50]:
                yield from containers(v, f"{name}[..]", depth - 1, seen)
        return
    scalar = isinstance(root, (str, bytes, int, float, bool, type(None)))
    if scalar or (callable(root) and not hasattr(root, "__dict__")):
        return
    attrs: dict[str, Any] = {}
    if hasattr(root, "__dict__"):
        attrs.update(vars(root))
    for cls in type(root).__mro__:
        for slot in getattr(cls, "__slots__", ()):
            if hasattr(root, slot):
                attrs[slot] = getattr(root, slot)
    for k, v in attrs.items():
        yield from containers(v, f"{name}.{k}", depth - 1, seen)


def lru_caches() -> list[tuple[str, int, int]]:
    """(function, entries, maxsize) of every functools.lru_cache in dhtnode's modules."""
    out = []
    for mod_name, mod in list(sys.modules.items()):
        if not mod_name.startswith("dhtnode"):
            continue
        for attr, fn in vars(mod).items():
            info = getattr(fn, "cache_info", None)
            if callable(info) and getattr(fn, "__module__", "") == mod_name:
                ci = info()
                out.append((f"{mod_name}.{attr}", ci.currsize, ci.maxsize or 0))
    return out


async def run(seconds: float, rate: float, swap_every: int) -> None:
    cfg = load_config(None)
    node = DhtNode(Identity.generate(), params_from_config(cfg), now=time.monotonic(),
                   wall=time.time, public_address=None, assume_reachable=True, seeds=[])
    services = plug_in(node, relay=cfg.relay.enabled, relay_limits=cfg.relay.limits())
    ep = await NodeEndpoint.create_on(open_udp_socket(HOST, 0), node)
    conns = Connections(ep, services)
    rng = random.Random(7)
    data = payloads(rng)
    sources = [rng.choice(PORTS) for _ in range(SOURCES)]
    roots = {"node": node, "endpoint": ep, "connections": conns}
    fed = 0
    tracemalloc.start(1)
    first: tracemalloc.Snapshot | None = None
    t0 = time.monotonic()
    next_report = t0
    try:
        while (now := time.monotonic()) < t0 + seconds:
            if now >= next_report:
                gc.collect()
                snap = tracemalloc.take_snapshot()
                first = first or snap
                traced = tracemalloc.get_traced_memory()[0]
                print(f"t={now - t0:5.0f} s fed {fed:>9,} rss {rss_kb(os.getpid()) / 1024:6.1f} MB "
                      f"traced {traced / 2**20:6.2f} MB", flush=True)
                seen: set[int] = set()
                for root_name, root in roots.items():
                    for path, n in containers(root, root_name, CENSUS_DEPTH, seen):
                        print(f"    {n:>8,}  {path}")
                for fn, n, cap in lru_caches():
                    if n > CENSUS_MIN:
                        print(f"    {n:>8,}  lru_cache {fn} (max {cap:,})")
                next_report += REPORT_S
            if fed > (now - t0) * rate:
                await asyncio.sleep(BATCH / rate)
                continue
            for _ in range(BATCH):
                if fed % swap_every == 0:  # a fresh source port
                    sources[rng.randrange(SOURCES)] = rng.choice(PORTS)
                ep.datagram_received(data[rng.randrange(len(data))],
                                     (HOST, sources[rng.randrange(SOURCES)]))
                fed += 1
            await asyncio.sleep(0)  # timers and the transport's sends run
        gc.collect()
        last = tracemalloc.take_snapshot()
        if first is not None:
            print("\ngrowth since the first report, by line:")
            for stat in last.compare_to(first, "lineno")[:15]:
                print(f"    {stat.size_diff / 1024:+9.1f} KB {stat.count_diff:+8,} blocks  "
                      f"{stat.traceback[0].filename.split('site-packages/')[-1]}:"
                      f"{stat.traceback[0].lineno}")
    finally:
        tracemalloc.stop()
        await conns.close()
        ep.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--rate", type=float, default=50000.0, help="datagrams/s at most")
    ap.add_argument("--swap-every", type=int, default=SWAP_EVERY,
                    help="datagrams per fresh source port (lower: the per-source tables fill "
                    "sooner than at the real flood's rate)")
    args = ap.parse_args()
    seconds = min(args.seconds, MAX_SECONDS)
    print(f"# in-process flood, {seconds:.0f} s at most {args.rate:.0f}/s, Python "
          f"{sys.version.split()[0]} ({Path(sys.executable).name})", flush=True)
    asyncio.run(run(seconds, args.rate, max(1, args.swap_every)))


if __name__ == "__main__":
    main()
