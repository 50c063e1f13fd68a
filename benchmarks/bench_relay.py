"""The blind relay: what starting relayed buys, what a relayed stream costs, what relaying costs.

Three parts, one figure per line, all under uvloop. Medians and p95 (nearest rank).

1. Relay first, in the NAT lab (tests/netlab.py; root with ``ip`` and ``nft``, else one skip
   line): five public ``dhtnode run --bootstrap-node`` nodes (the introducers, so the relays),
   ``dhtnode listen --echo`` behind a port-restricted NAT and another behind a symmetric NAT,
   and a runner in the client's namespace (this script, ``--lab-client``) that builds a fresh
   client node per connect (as ``dhtnode ping`` does) and reads the ``Connection`` itself:
   ``first_path``, ``path``, ``settled``. Two pairs, the ones that need a slow punch or none:

   * symmetric x port-restricted (birthday search): one connect from each of LAB_CONNECTS
     fresh symmetric hosts (each its own public IP: a cold search every time; repeat connects
     from one IP are helped by the mappings earlier searches left open);
   * symmetric x symmetric (no punch possible: relayed for good), LAB_CONNECTS connects one
     after another from one host.

   Per pair: (a) connect() start to the first echoed byte (connect + open a stream + one byte
   there and back), (b) connect() start until the connection is settled on the direct path and
   one byte went there and back on it, and how many ended relayed; where each connection
   started (``first_path``) and the strategy. Compare (a) with the target for a birthday
   connect (median <= 3 s, shared/targets.md) and with (b): the gap is what relay-first saves.
2. Throughput on one QUIC stream on 127.0.0.1 in this one process and loop (so each figure
   pays for both ends, and the relayed one for the relay node too): relayed (punch datagrams
   dropped so it stays relayed; relay limits raised so they do not throttle), direct, and a
   plain asyncio TCP stream, 12 MB one way (--quick: 4), 5 alternating rounds (--quick: 1),
   median MB/s; ratios, higher is better; the bytes the relay forwarded per payload byte, and
   QUIC's RTT estimate on each path (the relayed one has three nodes on one loop).
3. Relay CPU per forwarded datagram of 1,209 bytes (a full QUIC datagram in relay DATA), a
   one-way member flood: (i) ``RelayTable.receive`` alone, (ii) the engine's whole path
   without sockets (``DhtNode.receive`` -> relay service -> table -> ``ctx.send`` ->
   ``datagrams_to_send``), both by ``time.process_time()``; (iii) a relay node alone in its
   own process on a real socket (``NodeEndpoint``), fed by a windowed flood from this
   process, its CPU read from /proc, beside (iv) a plain uvloop UDP forwarder measured the
   same way (the floor of any Python relay here). Printed: us per datagram and CPU-seconds per
   forwarded MB; ratio = relay node / plain forwarder, lower is better.

Options: ``--quick`` cuts every count; ``--parts 123`` picks parts; ``--verbose`` prints every
lab connect; ``--keep-logs`` keeps the lab daemons' logs. A failure in the product is printed
as a figure line, never a crash. Nothing is sent outside 127.0.0.1 and the lab's namespaces.
Absolute times move between runs on shared machines (the load average is in the first line);
compare ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import uvloop
from benchkit import CHUNK, PARAMS, Peer, pct, run_parts, send_bulk, sink, start_dht, stop

import dhtnode.transport.connections as connections_module
from dhtnode.connect.services import plug_in
from dhtnode.crypto.identity import Identity
from dhtnode.dht.node import DhtNode
from dhtnode.nat.punch import PUNCH_DEADLINE
from dhtnode.nat.relay import RelayLimits, RelayTable
from dhtnode.transport.connection import Connection
from dhtnode.transport.relaypath import RelayPath
from dhtnode.transport.udp import NodeEndpoint, open_udp_socket
from dhtnode.wire import relay as wire
from dhtnode.wire.address import Address, normalize

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
DHT_NODES = 6
#: Relay limits that do not throttle a loopback transfer or a flood.
UNTHROTTLED = RelayLimits(session_rate=1e9, total_rate=1e9)
#: A full QUIC datagram (aioquic's 1200 bytes) in relay DATA: 1,209 bytes on the wire.
QUIC_DATAGRAM = 1200
#: Datagrams in flight in the socket flood (part 3): enough to keep the relay busy, few enough
#: not to overrun its 1 MB receive buffer.
FLOOD_WINDOW = 64
#: Target for a connect with one side symmetric (shared/targets.md).
TARGET_BIRTHDAY_MS = 3000.0
LAB_PORT = 49200
LAB_PUBLIC_NODES = 5
#: Seconds a lab connection may take to settle after its first echo (the punch deadline, and
#: a little more for the move).
SETTLE_TIMEOUT = PUNCH_DEADLINE + 3.0
#: Seconds one lab connect may take in all (fresh node, connect, echo, settle, close).
LAB_CONNECT_TIMEOUT = 30.0


@dataclass(frozen=True)
class Counts:
    lab_connects: int
    lab_budget: float
    bulk_mb: int
    rounds: int
    table_datagrams: int
    engine_datagrams: int
    socket_datagrams: int


FULL = Counts(lab_connects=10, lab_budget=95.0, bulk_mb=12, rounds=5,
              table_datagrams=300_000, engine_datagrams=100_000, socket_datagrams=100_000)
QUICK = Counts(lab_connects=4, lab_budget=40.0, bulk_mb=4, rounds=1,
               table_datagrams=50_000, engine_datagrams=20_000, socket_datagrams=10_000)


# --------------------------------------------------------------------------- helpers


def med_p95(values: list[float], unit: str = "ms") -> str:
    if not values:
        return "no samples"
    return (f"median {statistics.median(values):8.1f} {unit}   "
            f"p95 {pct(values, 95):8.1f} {unit}   (n={len(values)})")


def line(label: str, text: str) -> None:
    print(f"{label:<58}{text}", flush=True)


def ms_since(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 1)


async def echo_once(reader: asyncio.StreamReader, writer: Any, byte: bytes) -> None:
    writer.write(byte)
    await writer.drain()
    got = await asyncio.wait_for(reader.readexactly(1), 5)
    if got != byte:
        raise RuntimeError(f"echoed {got!r}, sent {byte!r}")


# --------------------------------------------------------------------------- part 1: lab


async def lab_client(key: str, bootstrap: list[str], count: int, budget: float) -> None:
    """Runs inside a lab namespace: ``count`` connects, each from a fresh client node as
    ``dhtnode ping KEY`` builds it; one JSON line per connect on stdout."""
    from dhtnode.daemon.config import apply_overrides, load_config
    from dhtnode.daemon.service import resolve

    with tempfile.TemporaryDirectory(prefix="bench-relay-client-") as state:
        cfg = apply_overrides(load_config(None), bootstrap=bootstrap, state_dir=Path(state))
        seeds = await resolve(cfg.node.bootstrap)
        end = time.monotonic() + budget
        for i in range(count):
            if time.monotonic() > end:
                print(json.dumps({"i": i, "ok": False, "error": "budget",
                                  "message": "out of time"}), flush=True)
                break
            t0 = time.perf_counter()
            try:
                out = await asyncio.wait_for(lab_connect(cfg, seeds, key), LAB_CONNECT_TIMEOUT)
                out = {"i": i, "ok": True, **out}
            except Exception as exc:
                out = {"i": i, "ok": False, "error": type(exc).__name__, "message": str(exc)}
            out["wall_ms"] = ms_since(t0)
            print(json.dumps(out), flush=True)


async def lab_connect(cfg: Any, seeds: list[Address], key: str) -> dict[str, Any]:
    """One connect from a fresh client node; times from connect() start."""
    from dhtnode.daemon.service import client_node

    t_node = time.perf_counter()
    async with client_node(cfg, bootstrap=seeds) as cn:
        out: dict[str, Any] = {"node_ms": ms_since(t_node),
                               "nat_class": cn.connections.my_info().nat_class}
        t0 = time.perf_counter()
        conn = await cn.connections.connect(bytes.fromhex(key))
        out["connect_ms"] = ms_since(t0)
        out["strategy"] = conn.strategy
        try:
            reader, writer = await conn.open_stream()
            await echo_once(reader, writer, b"\x01")
            out["first_byte_ms"] = ms_since(t0)
            out["first_path"] = conn.first_path
            out["path_at_first_byte"] = conn.path
            try:
                await asyncio.wait_for(conn.settled.wait(), SETTLE_TIMEOUT)
                out["settled_ms"] = ms_since(t0)
            except TimeoutError:
                out["settled_ms"] = None
            out["path"] = conn.path
            # What the QUIC connection really sends through (the path layer under it).
            out["sends_via"] = "relay" if isinstance(conn.quic.path, RelayPath) else "direct"
            if conn.path == "direct" and out["sends_via"] == "direct":
                if conn.first_path == "direct":
                    out["direct_echo_ms"] = out["first_byte_ms"]
                else:
                    await echo_once(reader, writer, b"\x02")  # one round trip on the new path
                    out["direct_echo_ms"] = ms_since(t0)
            else:
                await echo_once(reader, writer, b"\x03")  # the relayed path still carries
            writer.write_eof()
        finally:
            await conn.close(wait=False)
    return out


class Daemons:
    """``dhtnode`` processes inside lab namespaces, stopped by :meth:`close`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.files: list[Any] = []

    def start(self, name: str, ns: str, args: list[str]) -> subprocess.Popen[bytes]:
        out = (self.workdir / f"{name}.out").open("wb")
        log = (self.workdir / f"{name}.log").open("wb")
        self.files += [out, log]
        cmd = ["ip", "netns", "exec", ns, PY, "-m", "dhtnode", *args]
        p = subprocess.Popen(cmd, stdout=out, stderr=log, cwd=ROOT)
        self.procs.append(p)
        return p

    def wait_for(self, name: str, p: subprocess.Popen[bytes], file: str, needle: bytes,
                 timeout: float = 30.0) -> bytes:
        path = self.workdir / file
        deadline = time.monotonic() + timeout
        while True:
            text = path.read_bytes()
            if needle in text:
                return text
            if time.monotonic() > deadline or p.poll() is not None:
                log = (self.workdir / f"{name}.log").read_bytes()[-1500:]
                raise RuntimeError(f"{name} did not start: {log!r}")
            time.sleep(0.02)

    def nodes(self, hosts: list[Any]) -> list[str]:
        """``dhtnode run --bootstrap-node`` on each public host (the first one first)."""
        boot = f"{hosts[0].ip}:{LAB_PORT}"
        started = []
        for i, h in enumerate(hosts):
            name = f"pub{i}"
            args = ["run", "--bootstrap-node", "--public-host", h.ip, "--host", "::",
                    "--port", str(LAB_PORT), "--state-dir", str(self.workdir / name),
                    "--log-format", "json", "--log-level", "info"]
            p = self.start(name, h.ns, args + (["--bootstrap", boot] if i else []))
            started.append((name, p))
            if i == 0:  # the others join through it
                self.wait_for(name, p, f"{name}.log", b'"node_started"')
        for name, p in started[1:]:
            self.wait_for(name, p, f"{name}.log", b'"node_started"')
        return [f"{h.ip}:{LAB_PORT}" for h in hosts]

    def listeners(self, hosts: dict[str, Any], boot: str) -> dict[str, str]:
        """``dhtnode listen --echo`` on each host; returns the key each serves."""
        started = {
            name: self.start(name, h.ns, ["listen", "--echo", "--json", "--bootstrap", boot,
                                          "--state-dir", str(self.workdir / name)])
            for name, h in hosts.items()
        }
        keys = {}
        for name, p in started.items():
            text = self.wait_for(name, p, f"{name}.out", b"\n")
            res = json.loads(text.split(b"\n", 1)[0])
            if not res.get("listening"):
                raise RuntimeError(f"{name} did not listen: {res}")
            keys[name] = str(res["public_key"])
        return keys

    def close(self) -> None:
        for p in self.procs:
            stop(p)
        for f in self.files:
            f.close()


def run_runner(ns: str, key: str, boots: list[str], count: int,
               budget: float) -> list[dict[str, Any]]:
    """This script with ``--lab-client`` inside ``ns``: one result per connect."""
    cmd = ["ip", "netns", "exec", ns, PY, str(Path(__file__).resolve()), "--lab-client", key,
           "--count", str(count), "--budget", str(budget),
           *[a for b in boots for a in ("--bootstrap", b)]]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                             timeout=budget + LAB_CONNECT_TIMEOUT + 30)
    except subprocess.TimeoutExpired:
        return [{"ok": False, "error": "runner", "message": "did not finish in time"}]
    results = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    if out.returncode != 0 or not results:
        results.append({"ok": False, "error": "runner",
                        "message": f"exit {out.returncode}: {out.stderr[-300:]}"})
    return results


def report_lab(label: str, results: list[dict[str, Any]], count: int, verbose: bool,
               birthday: bool) -> None:
    print(f"{label}", flush=True)
    if verbose:
        for r in results:
            print(f"    {json.dumps(r)}", flush=True)
    ok = [r for r in results if r.get("ok")]
    first = [float(r["first_byte_ms"]) for r in ok]
    direct = [float(r["direct_echo_ms"]) for r in ok if r.get("direct_echo_ms") is not None]
    moved = [r for r in ok if r.get("first_path") == "relayed" and r.get("path") == "direct"]
    relayed_end = [r for r in ok if r.get("path") == "relayed"]
    line("  connect() to 1st echoed byte", med_p95(first))
    line("  connect() returned", med_p95([float(r["connect_ms"]) for r in ok]))
    if direct or not ok or relayed_end != ok:
        line("  connect() to settled on direct + 1 echo there", med_p95(direct))
    else:
        line("  connect() to settled on direct + 1 echo there",
             f"none: all {len(ok)} ended relayed")
    line("  connect() to settled (any path)",
         med_p95([float(r["settled_ms"]) for r in ok if r.get("settled_ms") is not None]))
    if first and direct:
        line("  how much sooner the 1st byte comes (b / a)",
             f"{statistics.median(direct) / statistics.median(first):8.1f}x")
    if first and birthday:
        line("  1st byte vs target (birthday median <= 3 s)",
             f"{statistics.median(first) / TARGET_BIRTHDAY_MS:8.3f}x  (lower is better)")
    line("  connects that worked", f"{len(ok)}/{count}"
         + ("" if birthday else "   (target: always, relayed)"))
    line("  started on", str(dict(Counter(str(r.get("first_path")) for r in ok))))
    line("  moved to direct / ended relayed / direct at once",
         f"{len(moved)} / {len(relayed_end)} / "
         f"{sum(r.get('first_path') == 'direct' for r in ok)}")
    unsettled = sum(r.get("settled_ms") is None for r in ok)
    if unsettled:
        line("  NOT settled within the punch deadline + 3 s", f"{unsettled}")
    mismatch = [r for r in ok if (r.get("path") == "direct") != (r.get("sends_via") == "direct")]
    if mismatch:
        line("  FAILED: Connection.path disagrees with the QUIC path",
             f"x{len(mismatch)}: {json.dumps(mismatch[0])[:200]}")
    line("  strategies / client NAT class",
         f"{dict(Counter(str(r.get('strategy')) for r in ok))} / "
         f"{dict(Counter(str(r.get('nat_class')) for r in ok))}")
    if ok:
        line("  fresh client node (bootstrap) before connect()",
             med_p95([float(r["node_ms"]) for r in ok]))
    errors = Counter(f"{r.get('error')}: {str(r.get('message', ''))[:200]}"
                     for r in results if not r.get("ok"))
    for err, n in errors.items():
        line(f"  FAILED x{n}", err)


def part_1(c: Counts, verbose: bool, keep: bool) -> None:
    print(f"\n# part 1: relay first, NAT lab, {c.lab_connects} connects per pair, "
          "`dhtnode listen --echo` behind the NAT named second", flush=True)
    sys.path.insert(0, str(ROOT))
    from tests.netlab import Lab, lab_available

    reason = lab_available()
    if reason:
        line("NAT lab", f"SKIPPED: {reason}")
        return
    workdir = Path(tempfile.mkdtemp(prefix="bench-relay-lab-"))
    lab = Lab()
    daemons = Daemons(workdir)
    try:
        t0 = time.monotonic()
        lab.start()
        pubs = [lab.host(f"pub{i}", kind="open") for i in range(LAB_PUBLIC_NODES)]
        servers = {"srv-pr": lab.host("srvpr", kind="port-restricted"),
                   "srv-sym": lab.host("srvsym", kind="symmetric")}
        cold = [lab.host(f"s{i}", kind="symmetric") for i in range(c.lab_connects)]
        one = lab.host("csym", kind="symmetric")
        t1 = time.monotonic()
        boots = daemons.nodes(pubs)
        t2 = time.monotonic()
        keys = daemons.listeners(servers, boots[0])
        line(f"lab set-up ({len(lab.namespaces)} namespaces, {LAB_PUBLIC_NODES} DHT nodes, "
             "2 listeners)", f"{time.monotonic() - t0:8.1f} s   (namespaces {t1 - t0:.1f} s, "
             f"DHT nodes {t2 - t1:.1f} s, listeners {time.monotonic() - t2:.1f} s)")
        end = time.monotonic() + c.lab_budget
        # Cold birthday searches: one connect per fresh symmetric host (its own public IP).
        results: list[dict[str, Any]] = []
        share = end - c.lab_budget * 0.25
        for h in cold:
            if time.monotonic() > share:
                results.append({"ok": False, "error": "budget", "message": "out of time"})
                break
            results += run_runner(h.ns, keys["srv-pr"], boots, 1, 1.0)
        report_lab("symmetric x port-restricted (birthday; cold: a new IP each)", results,
                   len(cold), verbose, birthday=True)
        results = run_runner(one.ns, keys["srv-sym"], boots, c.lab_connects,
                             max(1.0, end - time.monotonic()))
        report_lab("symmetric x symmetric (no punch: relay only; one host, back to back)",
                   results, c.lab_connects, verbose, birthday=False)
    except Exception as exc:
        line("NAT lab", f"FAILED: {type(exc).__name__}: {str(exc)[:300]}")
    finally:
        daemons.close()
        lab.close()
        if keep:
            print(f"# lab logs kept in {workdir}", flush=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


# --------------------------------------------------------------------------- part 2


def hold_punches(peer: Peer) -> None:
    """Drop every punch datagram ``peer`` receives: its attempts can never succeed."""
    peer.conns.punch.datagram = lambda slot, data, source: None  # type: ignore[method-assign]


def relay_stats(peers: list[Peer]) -> Counter[str]:
    total: Counter[str] = Counter()
    for p in peers:
        total.update(p.conns.services.relay.table.stats)
    return total


async def part_2(c: Counts) -> None:
    total = c.bulk_mb * 1_000_000 // CHUNK * CHUNK
    print(f"\n# part 2: one stream on 127.0.0.1, {total / 1e6:.1f} MB one way, {c.rounds} "
          f"alternating rounds, one process and loop ({DHT_NODES}-node DHT, relay limits "
          "raised)", flush=True)
    peers = await start_dht(DHT_NODES, relay_limits=UNTHROTTLED)
    tasks: set[asyncio.Task[None]] = set()

    async def sinks(conn: Connection) -> None:
        with contextlib.suppress(Exception):
            while True:
                reader, writer = await conn.accept_stream()
                await sink(reader, writer)

    def on_conn(conn: Connection) -> None:
        t = asyncio.ensure_future(sinks(conn))
        tasks.add(t)
        t.add_done_callback(tasks.discard)

    conns: dict[str, Connection] = {}
    tcp = await asyncio.start_server(sink, "127.0.0.1", 0)
    try:
        # The relayed pair: neither side ever sees a punch datagram; no grace for the punch.
        srv_r, cli_r, srv_d, cli_d = peers[-1], peers[-2], peers[-3], peers[-4]
        hold_punches(srv_r)
        hold_punches(cli_r)
        key_r, key_d = Identity.generate(), Identity.generate()
        await srv_r.conns.listen(key_r, on_conn)
        await srv_d.conns.listen(key_d, on_conn)
        grace = connections_module.RELAY_GRACE
        connections_module.RELAY_GRACE = 0.0
        try:
            conns["relayed"] = await asyncio.wait_for(cli_r.conns.connect(key_r.public_key), 20)
        except Exception as exc:
            line("relayed connect", f"FAILED: {type(exc).__name__}: {str(exc)[:200]}")
        finally:
            connections_module.RELAY_GRACE = grace
        if "relayed" in conns and conns["relayed"].path != "relayed":
            line("relayed connect", f"FAILED: started on {conns['relayed'].path}, not relayed")
            conns.pop("relayed")
        try:
            conns["direct"] = await asyncio.wait_for(cli_d.conns.connect(key_d.public_key), 20)
            await asyncio.wait_for(conns["direct"].settled.wait(), PUNCH_DEADLINE + 2)
            if conns["direct"].path != "direct":
                line("direct connect", f"FAILED: settled on {conns['direct'].path}")
                conns.pop("direct")
        except Exception as exc:
            line("direct connect", f"FAILED: {type(exc).__name__}: {str(exc)[:200]}")
            conns.pop("direct", None)
        port = tcp.sockets[0].getsockname()[1]
        rates: dict[str, list[float]] = {"relayed": [], "direct": [], "tcp": []}
        forwarded = 0
        for _ in range(c.rounds):
            for name in rates:
                try:
                    if name == "tcp":
                        treader, twriter = await asyncio.open_connection("127.0.0.1", port)
                        rates[name].append(await send_bulk(treader, twriter, total))
                        twriter.close()
                        continue
                    if name not in conns:
                        continue
                    before = relay_stats(peers)["relay_bytes"]
                    reader, writer = await conns[name].open_stream()
                    rates[name].append(await send_bulk(reader, writer, total))
                    if name == "relayed":
                        forwarded += relay_stats(peers)["relay_bytes"] - before
                except Exception as exc:
                    line(f"{name} transfer", f"FAILED: {type(exc).__name__}: {str(exc)[:200]}")
                    conns.pop(name, None)
        med = {k: statistics.median(v) for k, v in rates.items() if v}
        labels = {"relayed": "QUIC, relayed (punch held back)", "direct": "QUIC, direct",
                  "tcp": "baseline: TCP, asyncio streams"}
        for name, label in labels.items():
            if name in med:
                runs = ", ".join(f"{r:.1f}" for r in rates[name])
                line(label, f"{med[name]:8.1f} MB/s   (rounds: {runs})")
        if "relayed" in conns:
            conn = conns["relayed"]
            stayed = conn.path == "relayed" and isinstance(conn.quic.path, RelayPath)
            line("  relayed stayed relayed",
                 "yes" if stayed else f"NO: {conn.path}, {type(conn.quic.path).__name__}")
            line("  relay forwarded per payload byte (both ways)",
                 f"{forwarded / (total * len(rates['relayed'])):8.3f}")
            if "direct" in conns:
                line("  QUIC RTT estimate, relayed / direct",
                     f"{conn.rtt * 1000:8.2f} ms / {conns['direct'].rtt * 1000:.2f} ms")
            drops = {k: v for k, v in relay_stats(peers).items() if k.startswith("drop_")}
            if drops:
                line("  relay drops", str(drops))
        for a, b in (("relayed", "direct"), ("relayed", "tcp"), ("direct", "tcp")):
            if a in med and b in med:
                line(f"ratio {a} / {b}", f"{med[a] / med[b]:8.3f}")
    finally:
        tcp.close()
        for t in list(tasks):
            t.cancel()
        for conn in conns.values():
            with contextlib.suppress(Exception):
                await conn.close(wait=False)
        for p in peers:
            await p.conns.close()
            p.ep.close()


# --------------------------------------------------------------------------- part 3

MEMBER_A: Address = ("127.0.0.1", 40001)
MEMBER_B: Address = ("127.0.0.1", 40002)


def data_datagram(session: bytes) -> bytes:
    return wire.encode_data(wire.RelayType.DATA_TO_RELAY, session, os.urandom(QUIC_DATAGRAM))


def per_datagram(label: str, cpu: float, datagrams: int, nbytes: int) -> None:
    if not datagrams:
        line(label, "FAILED: nothing forwarded")
        return
    line(label, f"{cpu / datagrams * 1e6:8.2f} us/datagram   "
                f"{cpu / (nbytes / 1e6):7.4f} CPU-s/MB   ({datagrams} datagrams)")


def flood_table(n: int) -> tuple[float, int, int]:
    """(CPU seconds, datagrams forwarded, bytes forwarded): ``RelayTable.receive`` alone."""
    table = RelayTable(UNTHROTTLED, os.urandom, 0.0)
    session = table.new_session_id()
    for role, member in ((wire.ROLE_CLIENT, MEMBER_A), (wire.ROLE_SERVER, MEMBER_B)):
        token = table.mint(session, role, member, 0.0)
        table.receive(wire.encode_bind(wire.Bind(role, session, token)), member, 0.0)
    data = data_datagram(session)
    receive = table.receive
    forwarded = 0
    t0 = time.process_time()
    for i in range(n):
        forwarded += len(receive(data, MEMBER_A, i * 1e-6))
    cpu = time.process_time() - t0
    return cpu, forwarded, table.stats["relay_bytes"]


def flood_engine(n: int) -> tuple[float, int, int]:
    """The same through the engine: ``DhtNode.receive`` and ``datagrams_to_send``."""
    relay_addr: Address = ("127.0.0.1", 40000)
    node = DhtNode(Identity.generate(), PARAMS, now=0.0, wall=time.time,
                   public_address=relay_addr)
    services = plug_in(node, relay_limits=UNTHROTTLED)
    table = services.relay.table
    session = table.new_session_id()
    for role, member in ((wire.ROLE_CLIENT, MEMBER_A), (wire.ROLE_SERVER, MEMBER_B)):
        token = table.mint(session, role, member, 0.0)
        node.receive(wire.encode_bind(wire.Bind(role, session, token)), member, 0.0)
    node.datagrams_to_send()
    data = data_datagram(session)
    forwarded = 0
    t0 = time.process_time()
    for i in range(n):
        node.receive(data, MEMBER_A, i * 1e-6)
        forwarded += len(node.datagrams_to_send())
    cpu = time.process_time() - t0
    return cpu, forwarded, table.stats["relay_bytes"]


async def relay_child(mode: str, members: list[int]) -> None:
    """Runs as its own process: a relay node (``dhtnode``) or a plain uvloop UDP forwarder
    (``plain``) on 127.0.0.1 for members at ``members`` ports; prints its port (and the
    session and tokens), then serves until stdin closes."""
    loop = asyncio.get_running_loop()
    a: Address = ("127.0.0.1", members[0])
    b: Address = ("127.0.0.1", members[1])
    info: dict[str, Any] = {}
    closers: list[Callable[[], None]] = []
    if mode == "dhtnode":
        sock = open_udp_socket("127.0.0.1", 0)
        local = normalize(sock.getsockname())
        node = DhtNode(Identity.generate(), PARAMS, now=time.monotonic(), wall=time.time,
                       public_address=local)
        services = plug_in(node, relay_limits=UNTHROTTLED)
        ep = await NodeEndpoint.create_on(sock, node)
        closers.append(ep.close)
        table = services.relay.table
        session = table.new_session_id()
        info = {"port": local[1], "session": session.hex(),
                "tokens": [table.mint(session, role, m, node.ctx.now).hex()
                           for role, m in ((wire.ROLE_CLIENT, a), (wire.ROLE_SERVER, b))]}
    else:
        class Forward(asyncio.DatagramProtocol):
            transport: asyncio.DatagramTransport

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport  # type: ignore[assignment]

            def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
                dest = b if addr[1] == a[1] else a
                self.transport.sendto(b"\x33" + data[1:], dest)

        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            sock.setsockopt(socket.SOL_SOCKET, opt, 1 << 20)
        sock.bind(("127.0.0.1", 0))
        transport, _ = await loop.create_datagram_endpoint(Forward, sock=sock)
        closers.append(transport.close)
        info = {"port": sock.getsockname()[1]}
    print(json.dumps(info), flush=True)
    await loop.run_in_executor(None, sys.stdin.read)  # until the parent closes our stdin
    for close in closers:
        close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (from /proc; 10 ms resolution)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def flood_socket(mode: str, n: int, deadline: float) -> tuple[float, int, int, float, int]:
    """A relay child of ``mode`` fed ``n`` DATA datagrams from member A, at most
    FLOOD_WINDOW in flight, counted at member B. Returns (child CPU seconds, datagrams that
    arrived, bytes the relay sent, wall seconds, datagrams lost)."""
    ma = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    mb = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    child: subprocess.Popen[str] | None = None
    try:
        for s in (ma, mb):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            s.bind(("127.0.0.1", 0))
        ports = [ma.getsockname()[1], mb.getsockname()[1]]
        child = subprocess.Popen(
            [PY, str(Path(__file__).resolve()), "--relay-child", mode,
             "--members", f"{ports[0]},{ports[1]}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert child.stdout is not None
        ready, _, _ = select.select([child.stdout], [], [], 20)
        if not ready:
            raise RuntimeError(f"the {mode} relay process did not start")
        info = json.loads(child.stdout.readline())
        relay: Address = ("127.0.0.1", int(info["port"]))
        session = bytes.fromhex(info.get("session", "00" * wire.SESSION_ID_LEN))
        if mode == "dhtnode":
            for role, s in enumerate((ma, mb)):
                token = bytes.fromhex(info["tokens"][role])
                s.sendto(wire.encode_bind(wire.Bind(role, session, token)), relay)
            for s in (ma, mb):  # BOUND answers
                s.settimeout(5)
                while s.recv(2048)[0] != wire.RelayType.BOUND:
                    pass
        mb.setblocking(False)
        data = data_datagram(session)
        sent = arrived = lost = out_bytes = 0
        cpu0, t0 = cpu_seconds(child.pid), time.perf_counter()
        while arrived + lost < n and time.monotonic() < deadline:
            while sent < n and sent - arrived - lost < FLOOD_WINDOW:
                ma.sendto(data, relay)
                sent += 1
            if not select.select([mb], [], [], 0.1)[0]:
                lost = sent - arrived  # nothing for 100 ms: what is in flight is gone
                continue
            with contextlib.suppress(BlockingIOError):
                while True:
                    out_bytes += len(mb.recv(2048))
                    arrived += 1
        wall = time.perf_counter() - t0
        time.sleep(0.05)  # let the child finish the datagram it is on
        cpu = cpu_seconds(child.pid) - cpu0
        return cpu, arrived, out_bytes, wall, lost
    finally:
        if child is not None:
            if child.stdin is not None:
                with contextlib.suppress(OSError):
                    child.stdin.close()
            try:
                child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                stop(child)
            if child.stdout is not None:
                child.stdout.close()
        ma.close()
        mb.close()


def part_3(c: Counts) -> None:
    print(f"\n# part 3: relay CPU, one-way member flood of {QUIC_DATAGRAM + 9}-byte DATA "
          "datagrams", flush=True)
    cpu, n, nbytes = flood_table(c.table_datagrams)
    per_datagram("RelayTable.receive alone (no sockets)", cpu, n, nbytes)
    table_us = cpu / max(n, 1) * 1e6
    cpu, n, nbytes = flood_engine(c.engine_datagrams)
    per_datagram("engine path: DhtNode.receive .. send (no sockets)", cpu, n, nbytes)
    engine_us = cpu / max(n, 1) * 1e6
    results: dict[str, float] = {}
    for mode, label in (("dhtnode", "relay node in its own process, real socket"),
                        ("plain", "baseline: plain uvloop UDP forwarder, same")):
        try:
            cpu, n, nbytes, wall, lost = flood_socket(mode, c.socket_datagrams,
                                                      time.monotonic() + 20)
        except Exception as exc:
            line(label, f"FAILED: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        per_datagram(label, cpu, n, nbytes)
        if n:
            results[mode] = cpu / n
            line("  forwarded", f"{n / wall:8.0f} datagrams/s   {nbytes / wall / 1e6:7.1f} MB/s"
                 f"   relay busy {cpu / wall:.0%} of wall   lost {lost}")
    line("  share of the relay node's CPU in RelayTable / engine",
         f"{table_us / (results.get('dhtnode', 0) * 1e6 or math.inf):8.1%} / "
         f"{engine_us / (results.get('dhtnode', 0) * 1e6 or math.inf):.1%}")
    if "dhtnode" in results and "plain" in results:
        line("ratio relay node / plain forwarder (CPU per datagram)",
             f"{results['dhtnode'] / results['plain']:8.2f}x  (lower is better)")


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer connects, bytes, datagrams")
    ap.add_argument("--parts", default="123", help="which parts to run (default: 123)")
    ap.add_argument("--verbose", action="store_true", help="print every lab connect")
    ap.add_argument("--keep-logs", action="store_true", help="keep the lab's daemon logs")
    ap.add_argument("--lab-client", metavar="KEY", help=argparse.SUPPRESS)
    ap.add_argument("--bootstrap", action="append", default=[], help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, default=10, help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=float, default=60.0, help=argparse.SUPPRESS)
    ap.add_argument("--relay-child", choices=("dhtnode", "plain"), help=argparse.SUPPRESS)
    ap.add_argument("--members", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.lab_client:
        uvloop.run(lab_client(args.lab_client, args.bootstrap, args.count, args.budget))
        return
    if args.relay_child:
        members = [int(p) for p in args.members.split(",")]
        uvloop.run(relay_child(args.relay_child, members))
        return
    c = QUICK if args.quick else FULL
    t0 = time.monotonic()
    print(f"# blind relay, uvloop {version('uvloop')}, Python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}"
          f"{', --quick' if args.quick else ''}", flush=True)
    parts: dict[str, Callable[[], object]] = {
        "1": lambda: part_1(c, args.verbose, args.keep_logs),
        "2": lambda: uvloop.run(part_2(c)),
        "3": lambda: part_3(c),
    }
    run_parts(parts, args.parts, line, t0)


if __name__ == "__main__":
    main()
