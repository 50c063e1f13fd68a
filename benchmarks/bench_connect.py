"""Connect by public key: how long it takes, what it costs, how fast a stream then goes.

Four parts, one figure per line, all under uvloop. Medians and p95 (nearest rank) in ms.

1. In one process on 127.0.0.1: a 6-node DHT, one listener, CONNECTS connects one after
   another from one client node. connect() wall time (and the product's own connect_ms),
   and time to the first echoed byte (connect + open a stream + one byte there and back).
   CPU per connect is the process CPU time (``time.process_time()``) over the loop divided by
   the connects: both sides, the DHT nodes introducing them, the echo and the close all run
   in this one process, so it is the cost of both ends together.
2. As a user feels it: separate processes on 127.0.0.1 (three ``dhtnode run`` bootstrap
   nodes, ``dhtnode listen --echo``). A fresh ``dhtnode ping KEY --json`` is timed from
   process start to exit (connect, 3 x 32-byte echoes, close; its own connect_ms beside). A
   fresh ``dhtnode connect KEY`` with one byte already waiting on its stdin is timed from
   process start to that byte echoed back on its stdout: the figure HyperDHT reaches in about
   60 ms for consistent NATs (shared/targets.md), so ratio = ours / 60 ms, lower is better.
   The floors below it, timed the same way (start to first output): a bare interpreter, plus
   ``import dhtnode.cli.main``, plus ``dhtnode.daemon.service`` (what every connecting verb
   imports: aioquic, cryptography). first echo - last floor = what the connect itself adds.
3. Throughput on a fresh part-1 DHT: one QUIC stream carrying BULK_MB one way (the receiver
   answers with its byte count at EOF), side by side with the same bytes over a plain asyncio
   TCP stream and a plain UDP blast of 1200-byte datagrams (bytes that arrived / time), all
   on loopback in this one process and loop, so each figure pays for both ends. Ratio = QUIC /
   baseline, higher is better.
4. The NAT lab (tests/netlab.py; root with ``ip`` and ``nft``, else one skip line): five
   public ``dhtnode run --bootstrap-node`` nodes (all in the lab's one /24), ``dhtnode listen
   --echo`` behind a port-restricted NAT, and per client kind a runner in that client's
   namespace (this script, ``--lab-client``) connecting LAB_CONNECTS times one after another,
   each from a fresh client node built as ``dhtnode ping KEY`` builds it (fresh socket, fresh
   NAT samples). The "open" kind twice: through a daemon on a public host (``ping
   --via-daemon``: it knows it is reachable, so "direct") and as a fresh client (never
   "open": it cannot have proven reachability). Symmetric twice: repeatedly from one IP
   (earlier searches leave the listener's NAT open to many ports of that IP for 30 s, so
   later connects are faster) and cold, once each from LAB_CONNECTS fresh symmetric hosts.
   Printed per row: connect_ms median and p95, connected/attempted, strategies used and the
   client's NAT class, the whole run (new node + connect + echo + close), and each failure
   as a line. Part 4 stops starting connects after LAB_BUDGET seconds.

Bytecode: the child processes run with compiled bytecode (``.pyc``) as an installed package
has it. A shell with ``PYTHONDONTWRITEBYTECODE=1`` (as the dev containers set) would make every
fresh process compile all of dhtnode again (about 100 ms more per start here); the children
get that variable removed and ``PYTHONPYCACHEPREFIX`` pointed at a temporary directory, so
the warm-up run writes the cache there and the checkout stays untouched. ``--compile-each-run``
keeps the inherited setting instead.

Options: ``--quick`` cuts every count; ``--processes N`` sets part 2's runs; ``--parts 124``
picks parts; ``--verbose`` prints
every lab connect; ``--keep-logs`` keeps the lab daemons' logs. A failure in the product is
printed as a figure line, never a crash. Nothing is sent outside 127.0.0.1 and the lab's
namespaces. Absolute times move between runs on shared machines (the load average is in
the first line); compare ratios and breakdowns.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import dataclasses
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import uvloop
from benchkit import CHUNK, Peer, pct, run_parts, send_bulk, sink, start_dht, stop

from dhtnode.crypto.identity import Identity
from dhtnode.transport.connection import Connection

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
#: HyperDHT 6.34.0, consistent NATs: client process start to first echoed byte (targets.md).
HYPERDHT_FIRST_BYTE_MS = 60.0
DHT_NODES = 6
DATAGRAM = 1200
LAB_PORT = 49200
LAB_PUBLIC_NODES = 5
#: Client kind -> the strategy the pair should use against a port-restricted listener.
LAB_PAIRS = (
    ("port-restricted", "simultaneous"),
    ("open", "direct"),
    ("symmetric", "birthday"),
    ("sequential", "predict"),
)
#: Seconds one lab connect (fresh client node: bootstrap, connect, echo, close) may take.
LAB_CONNECT_TIMEOUT = 25.0
#: Seconds part 4 may start connects for, in all (--quick: 40%); a connect started in time
#: may still run LAB_CONNECT_TIMEOUT past it.
LAB_BUDGET = 150.0


@dataclass(frozen=True)
class Counts:
    connects: int
    processes: int
    bulk_mb: int
    lab_connects: int


FULL = Counts(connects=30, processes=12, bulk_mb=32, lab_connects=20)
QUICK = Counts(connects=10, processes=4, bulk_mb=8, lab_connects=5)


# --------------------------------------------------------------------------- helpers


def med_p95(values: list[float]) -> str:
    if not values:
        return "no samples"
    return f"median {statistics.median(values):8.1f} ms   p95 {pct(values, 95):8.1f} ms"


def line(label: str, text: str) -> None:
    print(f"{label:<56}{text}", flush=True)


def dhtnode_cmd(*args: str) -> list[str]:
    return [PY, "-m", "dhtnode", *args]


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def first_json_line(path: Path, p: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    """The first JSON line process ``p`` wrote to ``path`` (an error if it exits first or
    times out). Output goes to a file, not a pipe: a pipe nobody drains would stall it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_bytes()
        if b"\n" in text:
            return dict(json.loads(text.split(b"\n", 1)[0]))
        if p.poll() is not None:
            break
        time.sleep(0.02)
    raise RuntimeError(f"no JSON line from {p.args!r}: {path.read_bytes()!r}")


# --------------------------------------------------------------------------- part 1 and 3


async def echo_streams(conn: Connection) -> None:
    with contextlib.suppress(Exception):
        while True:
            reader, writer = await conn.accept_stream()
            while data := await reader.read(CHUNK):
                writer.write(data)
                await writer.drain()
            writer.write_eof()


async def sink_streams(conn: Connection) -> None:
    with contextlib.suppress(Exception):
        while True:
            reader, writer = await conn.accept_stream()
            await sink(reader, writer)


class UdpCounter(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.bytes = 0
        self.datagrams = 0
        self.last = 0.0

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.bytes += len(data)
        self.datagrams += 1
        self.last = time.perf_counter()


async def udp_blast(total: int) -> tuple[float, float]:
    """Blast ``total`` bytes of 1200-byte datagrams at a counter on the same loop (bursts of
    32, yielding between so the receiver runs). Returns (MB/s that arrived, share arrived)."""
    loop = asyncio.get_running_loop()
    rx_t, rx = await loop.create_datagram_endpoint(UdpCounter, local_addr=("127.0.0.1", 0))
    tx_t, _ = await loop.create_datagram_endpoint(
        asyncio.DatagramProtocol, remote_addr=rx_t.get_extra_info("sockname")
    )
    try:
        for tr in (rx_t, tx_t):
            s = tr.get_extra_info("socket")
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        payload = os.urandom(DATAGRAM)
        count = total // DATAGRAM
        t0 = time.perf_counter()
        for i in range(count):
            tx_t.sendto(payload)
            if i % 32 == 31:
                await asyncio.sleep(0)
        end = time.perf_counter() + 1.0
        while time.perf_counter() < end and rx.datagrams < count:
            await asyncio.sleep(0.005)
        elapsed = max(rx.last - t0, 1e-9)
        return rx.bytes / elapsed / 1e6, rx.datagrams / count
    finally:
        tx_t.close()
        rx_t.close()


class Tasks:
    """Server-side tasks (echo, sink), cancelled at the end."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Future[None]] = set()

    def spawn(self, coro: Awaitable[None]) -> None:
        t = asyncio.ensure_future(coro)
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    def cancel(self) -> None:
        for t in list(self.tasks):
            t.cancel()


async def with_dht(body: Callable[[list[Peer], Tasks], Awaitable[None]]) -> None:
    peers = await start_dht(DHT_NODES)
    tasks = Tasks()
    try:
        await body(peers, tasks)
    finally:
        tasks.cancel()
        for p in peers:
            await p.conns.close()
            p.ep.close()


async def part_1(c: Counts, peers: list[Peer], tasks: Tasks) -> None:
    servers = sum(p.ep.node.server for p in peers)
    print(f"# part 1: {DHT_NODES}-node DHT on 127.0.0.1 in this process ({servers} serving), "
          f"{c.connects} connects one after another (after 2 warm-up)", flush=True)
    server, client = peers[-1], peers[-2]
    key = Identity.generate()
    me = Identity.generate()
    await server.conns.listen(key, lambda conn: tasks.spawn(echo_streams(conn)))
    connect_ms: list[float] = []
    first_byte_ms: list[float] = []
    own_ms: list[float] = []
    strategies: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    cpu0 = wall0 = 0.0
    for i in range(c.connects + 2):
        if i == 2:
            cpu0, wall0 = time.process_time(), time.perf_counter()
        t0 = time.perf_counter()
        try:
            conn = await asyncio.wait_for(client.conns.connect(key.public_key, identity=me), 20)
            t1 = time.perf_counter()
            reader, writer = await conn.open_stream()
            writer.write(b"x")
            await writer.drain()
            got = await asyncio.wait_for(reader.read(1), 5)
            t2 = time.perf_counter()
            writer.write_eof()
            await conn.close()
        except Exception as exc:  # a product failure is a figure, not a crash
            failures[f"{type(exc).__name__}: {str(exc)[:80]}"] += 1
            continue
        if got != b"x":
            failures["wrong echo"] += 1
        elif i >= 2:
            connect_ms.append((t1 - t0) * 1000)
            first_byte_ms.append((t2 - t0) * 1000)
            own_ms.append(conn.connect_ms)
            strategies[conn.strategy] += 1
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    n = max(len(connect_ms), 1)
    line("connect() wall time", med_p95(connect_ms))
    line("  the product's own connect_ms", med_p95(own_ms))
    line("connect() to first echoed byte", med_p95(first_byte_ms))
    line("CPU per connect (both sides + DHT, one process)",
         f"{cpu / n * 1000:8.1f} ms   (loop wall {wall / n * 1000:.1f} ms per connect: "
         "connect, echo, close)")
    line("connects that worked",
         f"{len(connect_ms)}/{c.connects}  strategies {dict(strategies)}"
         + (f"  failures {dict(failures)}" if failures else ""))


async def part_3(c: Counts, peers: list[Peer], tasks: Tasks) -> None:
    total = c.bulk_mb * 1_000_000 // CHUNK * CHUNK
    print(f"\n# part 3: throughput on 127.0.0.1, {total / 1e6:.1f} MB one way, one process, "
          "one loop", flush=True)
    server, client = peers[-1], peers[-2]
    key = Identity.generate()
    await server.conns.listen(key, lambda conn: tasks.spawn(sink_streams(conn)))
    quic_rate: float | None = None
    try:
        conn = await asyncio.wait_for(
            client.conns.connect(key.public_key, identity=Identity.generate()), 20)
        reader, writer = await conn.open_stream()
        quic_rate = await send_bulk(reader, writer, total)
        await conn.close()
    except Exception as exc:
        line("QUIC, one stream", f"FAILED: {type(exc).__name__}: {exc}")
    tcp = await asyncio.start_server(sink, "127.0.0.1", 0)
    try:
        port = tcp.sockets[0].getsockname()[1]
        treader, twriter = await asyncio.open_connection("127.0.0.1", port)
        tcp_rate = await send_bulk(treader, twriter, total)
        twriter.close()
    finally:
        tcp.close()
    udp_rate, arrived = await udp_blast(total)
    if quic_rate is not None:
        line("QUIC, one stream", f"{quic_rate:8.1f} MB/s")
    line("baseline: TCP, asyncio streams", f"{tcp_rate:8.1f} MB/s")
    line("baseline: UDP blast, 1200-byte datagrams",
         f"{udp_rate:8.1f} MB/s arrived ({arrived:.0%} of datagrams)")
    if quic_rate is not None:
        line("ratio QUIC / TCP", f"{quic_rate / tcp_rate:8.3f}")
        line("ratio QUIC / UDP blast", f"{quic_rate / udp_rate:8.3f}")


# --------------------------------------------------------------------------- part 2


class Daemons:
    """``dhtnode`` processes (optionally inside a namespace), stopped by :meth:`close`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Any] = []

    def start(self, name: str, args: list[str], *,
              ns: str | None = None) -> subprocess.Popen[bytes]:
        """Start ``dhtnode ARGS``: stdout to <name>.out, stderr to <name>.log."""
        out = (self.workdir / f"{name}.out").open("wb")
        log = (self.workdir / f"{name}.log").open("wb")
        self.logs += [out, log]
        cmd = (["ip", "netns", "exec", ns] if ns else []) + dhtnode_cmd(*args)
        p = subprocess.Popen(cmd, stdout=out, stderr=log, cwd=ROOT)
        self.procs.append(p)
        return p

    def run_node(self, name: str, host: str, port: int, bootstrap: str | None,
                 ns: str | None = None, bind: str = "::") -> None:
        args = ["run", "--bootstrap-node", "--public-host", host, "--host", bind,
                "--port", str(port),
                "--state-dir", str(self.workdir / name), "--log-format", "json",
                "--log-level", "info"]
        if bootstrap:
            args += ["--bootstrap", bootstrap]
        p = self.start(name, args, ns=ns)
        log = self.workdir / f"{name}.log"
        deadline = time.monotonic() + 15
        while b'"node_started"' not in log.read_bytes():
            if time.monotonic() > deadline or p.poll() is not None:
                raise RuntimeError(f"{name} did not start: {log.read_text()[-2000:]}")
            time.sleep(0.02)

    def loopback_network(self) -> tuple[str, str]:
        """Three ``dhtnode run`` bootstrap nodes (dht0-dht2) and ``dhtnode listen --echo`` on
        127.0.0.1: returns (the first node's HOST:PORT, the key the listener serves)."""
        ports = [free_udp_port() for _ in range(3)]
        boot = f"127.0.0.1:{ports[0]}"
        for i, port in enumerate(ports):
            self.run_node(f"dht{i}", "127.0.0.1", port, boot if i else None, bind="127.0.0.1")
        return boot, self.listen("listener", boot, bind="127.0.0.1")

    def listen(self, name: str, bootstrap: str, ns: str | None = None,
               bind: str | None = None) -> str:
        """``dhtnode listen --echo``; returns the key it serves once it is listening."""
        host = ["--host", bind] if bind else []
        p = self.start(name, ["listen", "--echo", "--json", "--bootstrap", bootstrap, *host,
                              "--state-dir", str(self.workdir / name)],
                       ns=ns)
        res = first_json_line(self.workdir / f"{name}.out", p, 30)
        if not res.get("listening"):
            raise RuntimeError(f"listener did not start: {res}")
        return str(res["public_key"])

    def close(self) -> None:
        for p in self.procs:
            stop(p)
        for f in self.logs:
            f.close()


def timed_floor(imports: str) -> float:
    """ms from starting ``python -c`` (importing ``imports``, if any) to its first byte on
    stdout: comparable with the first-echo figure, and without interpreter tear-down."""
    code = (f"import {imports}; " if imports else "") + "import os; os.write(1, b'.')"
    t0 = time.perf_counter()
    p = subprocess.Popen([PY, "-c", code], stdout=subprocess.PIPE, cwd=ROOT)
    assert p.stdout is not None
    got = p.stdout.read(1)
    ms = (time.perf_counter() - t0) * 1000
    p.stdout.close()
    if p.wait(timeout=30) != 0 or got != b".":
        raise RuntimeError(f"python -c {code!r} failed")
    return ms


def client_args(boot: str, state: Path) -> list[str]:
    """Loopback only, and a state dir of our own (no user config or node cache is read)."""
    return ["--bootstrap", boot, "--host", "127.0.0.1", "--state-dir", str(state), "--json"]


def ping_process(key: str, boot: str, state: Path) -> tuple[float, float, str]:
    """A fresh ``dhtnode ping KEY --json``: (ms start to exit, its connect_ms, strategy)."""
    t0 = time.perf_counter()
    out = subprocess.run(dhtnode_cmd("ping", key, *client_args(boot, state)),
                         capture_output=True, cwd=ROOT, timeout=60)
    wall = (time.perf_counter() - t0) * 1000
    res = json.loads(out.stdout.splitlines()[-1]) if out.stdout else {}
    if out.returncode != 0 or not res.get("ok"):
        raise RuntimeError(f"ping exit {out.returncode}: {out.stdout!r} {out.stderr[-500:]!r}")
    return wall, float(res["connect_ms"]), str(res["strategy"])


def connect_process(key: str, boot: str, state: Path) -> tuple[float, float | None]:
    """A fresh ``dhtnode connect KEY --json`` with one NUL byte waiting on its stdin: (ms from
    process start to that byte echoed on its stdout, its connect_ms if printed). A NUL byte
    cannot be part of a JSON line, wherever the verb prints its JSON."""
    with tempfile.TemporaryFile() as errf:
        t0 = time.perf_counter()
        p = subprocess.Popen(dhtnode_cmd("connect", key, *client_args(boot, state)),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errf,
                             cwd=ROOT)
        assert p.stdin is not None and p.stdout is not None
        seen = b""
        first: float | None = None
        try:
            p.stdin.write(b"\x00")
            p.stdin.flush()
            fd = p.stdout.fileno()
            while first is None:
                chunk = os.read(fd, 65536)  # the process's own timeouts end this
                if not chunk:
                    break
                seen += chunk
                if b"\x00" in seen:
                    first = (time.perf_counter() - t0) * 1000
            p.stdin.close()  # EOF: the echo ends, the process exits
            seen += p.stdout.read()
            p.wait(timeout=30)
        finally:
            stop(p)
            p.stdout.close()
        errf.seek(0)
        err = errf.read()
    if first is None:
        raise RuntimeError(f"connect: no echo (exit {p.returncode}): {err[-500:]!r}")
    connect_ms = None
    for raw in (seen + b"\n" + err).replace(b"\x00", b"\n").splitlines():
        if raw.startswith(b"{") and b"connect_ms" in raw:
            connect_ms = float(json.loads(raw)["connect_ms"])
    return first, connect_ms


def part_2(c: Counts) -> None:
    print(f"\n# part 2: fresh CLI processes on 127.0.0.1 (3 `dhtnode run` bootstrap nodes, "
          f"`dhtnode listen --echo`), {c.processes} runs each, alternating", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-connect-") as d:
        daemons = Daemons(Path(d))
        try:
            boot, key = daemons.loopback_network()
            floors: dict[str, list[float]] = {"pass": [], "cli": [], "service": []}
            floor_imports = {
                "pass": "",
                "cli": "dhtnode.cli.main",
                "service": "dhtnode.cli.main, dhtnode.daemon.service",
            }
            ping_wall: list[float] = []
            ping_own: list[float] = []
            first_byte: list[float] = []
            conn_own: list[float] = []
            strategies: Counter[str] = Counter()
            failures: list[str] = []
            for i in range(c.processes + 1):  # run 0 warms the page cache
                for name, imports in floor_imports.items():
                    ms = timed_floor(imports)
                    if i:
                        floors[name].append(ms)
                try:
                    wall, own, strategy = ping_process(key, boot, Path(d) / "client")
                    if i:
                        ping_wall.append(wall)
                        ping_own.append(own)
                        strategies[strategy] += 1
                except Exception as exc:
                    failures.append(f"ping: {exc}")
                try:
                    fb, cms = connect_process(key, boot, Path(d) / "client")
                    if i:
                        first_byte.append(fb)
                        if cms is not None:
                            conn_own.append(cms)
                except Exception as exc:
                    failures.append(f"connect: {exc}")
        finally:
            daemons.close()
    line("floor: bare interpreter, start to 1st output", med_p95(floors["pass"]))
    line("floor: + import dhtnode.cli.main", med_p95(floors["cli"]))
    line("floor: + import dhtnode.daemon.service (aioquic)", med_p95(floors["service"]))
    line("`dhtnode ping KEY`: process start to exit", med_p95(ping_wall))
    line("  its own connect_ms", med_p95(ping_own))
    line("`dhtnode connect KEY`: start to 1st echoed byte", med_p95(first_byte))
    line("  its own connect_ms", med_p95(conn_own))
    if first_byte:
        ratio = statistics.median(first_byte) / HYPERDHT_FIRST_BYTE_MS
        line("ratio vs HyperDHT (~60 ms start to 1st echo)", f"{ratio:8.2f}x  (target <= 1.0)")
    line("CLI runs that worked",
         f"ping {len(ping_wall)}/{c.processes}, connect {len(first_byte)}/{c.processes}"
         f"  strategies {dict(strategies)}")
    for f in failures[:5]:
        line("  FAILED", f[:300])


# --------------------------------------------------------------------------- part 4


async def lab_client(key: str, bootstrap: list[str], count: int, budget: float) -> None:
    """Runs inside a lab namespace: ``count`` connects, each from a fresh client node as
    ``dhtnode ping KEY`` builds it; one JSON line per connect on stdout."""
    from dhtnode.daemon.config import apply_overrides, load_config

    with tempfile.TemporaryDirectory(prefix="bench-lab-client-") as state:
        cfg = apply_overrides(load_config(None), bootstrap=bootstrap, state_dir=Path(state))
        await lab_connects(cfg, key, count, budget)


async def lab_connects(cfg: Any, key: str, count: int, budget: float) -> None:
    from dhtnode.daemon.service import client_node, ping_key, resolve

    seeds = await resolve(cfg.node.bootstrap)
    end = time.monotonic() + budget
    for i in range(count):
        if time.monotonic() > end:
            print(json.dumps({"i": i, "ok": False, "error": "budget", "message": "out of time"}),
                  flush=True)
            break
        t0 = time.perf_counter()

        async def one() -> dict[str, Any]:
            async with client_node(cfg, bootstrap=seeds) as cn:
                info = cn.connections.my_info()
                res = await ping_key(cn.connections, key)
                return {**res, "nat_class": info.nat_class, "ports": list(info.port_samples),
                        "open": info.open}

        try:
            res = await asyncio.wait_for(one(), LAB_CONNECT_TIMEOUT)
            out = {"i": i, "ok": True, **res}
        except Exception as exc:
            out = {"i": i, "ok": False, "error": type(exc).__name__, "message": str(exc)}
        out["wall_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        out["at"] = round(time.time(), 3)
        print(json.dumps(out), flush=True)


async def via_daemon(sock: Path, key: str, count: int, budget: float) -> list[dict[str, Any]]:
    """``count`` connects by the daemon at ``sock`` (the ``ping --via-daemon`` path)."""
    from dhtnode.daemon import control

    out: list[dict[str, Any]] = []
    end = time.monotonic() + budget
    for i in range(count):
        if time.monotonic() > end:
            out.append({"i": i, "ok": False, "error": "budget", "message": "out of time"})
            break
        t0 = time.perf_counter()
        try:
            res = await control.request(sock, "ping_key", timeout=LAB_CONNECT_TIMEOUT,
                                        public_key=key)
            r = {"i": i, "ok": True, **res}
        except Exception as exc:
            r = {"i": i, "ok": False, "error": type(exc).__name__, "message": str(exc)}
        r["wall_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        out.append(r)
    return out


def report_pair(label: str, results: list[dict[str, Any]], count: int, verbose: bool) -> None:
    if verbose:
        for r in results:
            print(f"    {json.dumps(r)}", flush=True)
    ok = [r for r in results if r.get("ok")]
    line(label, "connect_ms " + med_p95([float(r["connect_ms"]) for r in ok]))
    strategies = dict(Counter(str(r.get("strategy")) for r in ok))
    nat = dict(Counter(str(r["nat_class"]) for r in ok if "nat_class" in r))
    line("  connected", f"{len(ok)}/{count}  strategies {strategies}"
         + (f"  client's NAT class {nat}" if nat else ""))
    if ok:
        line("  whole run: new node, connect, echo, close" if nat else
             "  whole request: connect, echo, close",
             "           " + med_p95([float(r["wall_ms"]) for r in ok]))
    errors = Counter(f"{r['error']}: {str(r.get('message', ''))[:300]}"
                     for r in results if not r.get("ok"))
    for err, n in errors.items():
        line(f"  FAILED x{n}", err)


def run_runner(ns: str, key: str, boots: list[str], count: int,
               budget: float) -> tuple[list[dict[str, Any]], str]:
    """This script with ``--lab-client`` inside ``ns``: (one result per connect, trouble)."""
    cmd = ["ip", "netns", "exec", ns, PY, str(Path(__file__).resolve()), "--lab-client", key,
           "--count", str(count), "--budget", str(budget),
           *[a for b in boots for a in ("--bootstrap", b)]]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                             timeout=budget + LAB_CONNECT_TIMEOUT + 30)
    except subprocess.TimeoutExpired:
        return [], "the runner did not finish in time"
    results = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    trouble = "" if out.returncode == 0 else f"exit {out.returncode}: {out.stderr[-300:]}"
    return results, trouble


def part_4(c: Counts, verbose: bool, keep: bool) -> None:
    print(f"\n# part 4: NAT lab, `dhtnode listen --echo` behind a port-restricted NAT, "
          f"{c.lab_connects} connects per client kind", flush=True)
    sys.path.insert(0, str(ROOT))
    from tests.netlab import Lab, lab_available

    reason = lab_available()
    if reason:
        line("NAT lab", f"SKIPPED: {reason}")
        return
    row_budget = 40.0 if c.lab_connects > 5 else 15.0
    part_end = time.monotonic() + (LAB_BUDGET if c.lab_connects > 5 else LAB_BUDGET / 2.5)

    def budget() -> float:
        """Seconds the next row may start connects for: its own share, within the part's."""
        return min(row_budget, part_end - time.monotonic())
    workdir = Path(tempfile.mkdtemp(prefix="bench-connect-lab-"))
    lab = Lab()
    daemons = Daemons(workdir)
    try:
        t0 = time.monotonic()
        lab.start()
        pubs = [lab.host(f"pub{i}", kind="open") for i in range(LAB_PUBLIC_NODES)]
        server = lab.host("srv", kind="port-restricted")
        clients = {kind: lab.host(f"c{i}", kind=kind) for i, (kind, _) in enumerate(LAB_PAIRS)}
        cold = [lab.host(f"s{i}", kind="symmetric") for i in range(c.lab_connects)]
        boot = f"{pubs[0].ip}:{LAB_PORT}"
        for i, h in enumerate(pubs):
            daemons.run_node(f"pub{i}", h.ip, LAB_PORT, boot if i else None, ns=h.ns)
        boots = [f"{h.ip}:{LAB_PORT}" for h in pubs]
        key = daemons.listen("listener", boot, ns=server.ns)
        line(f"lab set-up ({len(lab.namespaces)} namespaces, 5 DHT nodes, listener)",
             f"{time.monotonic() - t0:8.1f} s")
        for kind, expected in LAB_PAIRS:
            if kind == "open":
                # An open host's daemon knows it is reachable: the direct strategy.
                sock = workdir / f"pub{LAB_PUBLIC_NODES - 1}" / "control.sock"
                results = uvloop.run(via_daemon(sock, key, c.lab_connects, budget()))
                report_pair("open (daemon, ping --via-daemon) x port-restr.", results,
                            c.lab_connects, verbose)
                expected = "fresh client"
            if kind == "symmetric":
                expected = "birthday, one client IP"
            results, trouble = run_runner(clients[kind].ns, key, boots, c.lab_connects,
                                          budget())
            report_pair(f"{kind} x port-restricted ({expected})", results, c.lab_connects,
                        verbose)
            if trouble:
                line("  runner FAILED", trouble)
        # Each connect above leaves the listener's NAT open (UNREPLIED conntrack entries,
        # 30 s) to the ports it searched at that client IP, which later sprays from the same
        # IP can hit. One connect per fresh symmetric host (its own public IP) is the cold case.
        results = []
        end = time.monotonic() + budget()
        for h in cold:
            if time.monotonic() > end:
                results.append({"ok": False, "error": "budget", "message": "out of time"})
                break
            res, trouble = run_runner(h.ns, key, boots, 1, 1.0)
            results += res or [{"ok": False, "error": "runner", "message": trouble}]
        report_pair("symmetric x port-restr. (birthday, cold: new IP)", results, len(cold),
                    verbose)
    except Exception as exc:
        line("NAT lab", f"FAILED: {type(exc).__name__}: {exc}")
    finally:
        daemons.close()
        lab.close()
        if keep:
            print(f"# lab logs kept in {workdir}", flush=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


# --------------------------------------------------------------------------- main


def use_bytecode_cache() -> str:
    """Let child processes read and write ``.pyc`` files (see the module docstring); the
    cache lives in a temporary directory removed at exit. Returns how, for the header."""
    if not sys.flags.dont_write_bytecode and "PYTHONPYCACHEPREFIX" in os.environ:
        return f"cached in {os.environ['PYTHONPYCACHEPREFIX']}"
    cache = tempfile.TemporaryDirectory(prefix="bench-connect-pyc-")
    atexit.register(cache.cleanup)
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = cache.name
    return "cached (warm-up run writes it)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer connects, runs and bytes")
    ap.add_argument("--parts", default="1234", help="which parts to run (default: 1234)")
    ap.add_argument("--processes", type=int, default=None,
                    help="part 2: fresh processes of each kind (default 12, --quick 4)")
    ap.add_argument("--compile-each-run", action="store_true",
                    help="keep PYTHONDONTWRITEBYTECODE for child processes (see the docstring)")
    ap.add_argument("--verbose", action="store_true", help="print every lab connect")
    ap.add_argument("--keep-logs", action="store_true", help="keep the lab's daemon logs")
    ap.add_argument("--lab-client", metavar="KEY", help=argparse.SUPPRESS)
    ap.add_argument("--bootstrap", action="append", default=[], help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, default=20, help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=float, default=60.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.lab_client:
        uvloop.run(lab_client(args.lab_client, args.bootstrap, args.count, args.budget))
        return
    c = QUICK if args.quick else FULL
    if args.processes is not None:
        c = dataclasses.replace(c, processes=args.processes)
    pyc = "compiled each run" if args.compile_each_run else use_bytecode_cache()
    t0 = time.monotonic()
    print(f"# connect by public key, uvloop {version('uvloop')}, Python "
          f"{sys.version.split()[0]}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}{', --quick' if args.quick else ''}, children's "
          f"bytecode: {pyc}", flush=True)
    parts: dict[str, Callable[[], None]] = {
        "1": lambda: uvloop.run(with_dht(lambda peers, tasks: part_1(c, peers, tasks))),
        "2": lambda: part_2(c),
        "3": lambda: uvloop.run(with_dht(lambda peers, tasks: part_3(c, peers, tasks))),
        "4": lambda: part_4(c, args.verbose, args.keep_logs),
    }
    run_parts(parts, args.parts, line, t0)


if __name__ == "__main__":
    main()
