"""A real daemon under a malformed-datagram flood: does it stay up, small and answering?

Issue 6's check. One `dhtnode run --bootstrap-node` daemon on 127.0.0.1 (scratch state dir,
`--port 0`, JSON logs) is flooded for SECONDS (default 60, `--quick` = 10) with random and
malformed datagrams (random bytes, truncated and bit-flipped DHT requests, garbage STUN and
QUIC-looking headers) at about RATE datagrams/s (default 50,000), sent by WORKERS processes from
many UDP sockets that are re-created all the time, so the source ports keep changing.
Meanwhile a legitimate client (an in-process `DhtNode` on a `NodeEndpoint`, the real client
code) sends DHT PINGs at 20/s, before the flood (baseline) and during it.

Measured: datagrams/s actually sent; the daemon's RSS (VmRSS) at start, peak and end; the share
of legitimate pings answered (target >= 99%) and their RTT median/p95 before vs during the
flood; the daemon's `drop_*` counters (and rx counters) from `dhtnode status --json`; whether
the daemon is alive and answering at the end. Target (issue 6): no crash, >= 99% answered,
RSS within 10 MB.

Only 127.0.0.1 is used; every loop is bounded by time and every process is stopped in
`finally`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchkit import stop

from dhtnode.crypto.identity import Identity
from dhtnode.dht.node import DhtNode, DhtParams
from dhtnode.errors import DhtnodeError
from dhtnode.transport.udp import NodeEndpoint, open_udp_socket
from dhtnode.wire import messages as m

HOST = "127.0.0.1"
PY = sys.executable
PING_RATE = 20.0
BASELINE_S = 5.0
PING_TIMEOUT_S = 5.0
#: Sockets each flood worker keeps open; one is closed and replaced every SWAP_EVERY datagrams.
SOCKETS = 32
SWAP_EVERY = 200
BATCH = 250
STUN_COOKIE = bytes.fromhex("2112a442")


# --------------------------------------------------------------------------- flood worker


def payloads(rng: random.Random, n: int = 4096) -> list[bytes]:
    """Malformed and random datagrams of several kinds (none of them a valid request)."""
    valid: list[bytes] = []
    for cmd in m.Command:
        for _ in range(4):
            with contextlib.suppress(Exception):
                valid.append(m.encode_request(m.Request(
                    cmd, rng.getrandbits(32), rng.randbytes(32), rng.randbytes(32),
                    rng.randbytes(16), rng.randbytes(rng.randrange(1, 200)))))
    valid = valid or [b"\x01" * 48]
    out: list[bytes] = []
    for i in range(n):
        kind = i % 6
        if kind == 0:  # random bytes, any length
            out.append(rng.randbytes(rng.randrange(0, 1400)))
        elif kind == 1:  # a real request, truncated
            v = rng.choice(valid)
            out.append(v[: rng.randrange(0, len(v))])
        elif kind == 2:  # a real request with a few bytes flipped
            b = bytearray(rng.choice(valid))
            for _ in range(rng.randrange(1, 4)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            out.append(bytes(b))
        elif kind == 3:  # a real request with junk appended or a lying length
            v = rng.choice(valid)
            out.append(v + rng.randbytes(rng.randrange(1, 64)))
        elif kind == 4:  # STUN header (binding request), garbage attributes
            body = rng.randbytes(rng.randrange(0, 80))
            length = rng.choice([len(body), rng.randrange(0, 65536)])
            out.append(b"\x00\x01" + length.to_bytes(2, "big") + STUN_COOKIE
                       + rng.randbytes(12) + body)
        else:  # QUIC-looking long header, garbage
            out.append(bytes([0xC0 | rng.randrange(64)]) + rng.randbytes(rng.randrange(4, 1300)))
    return out


def new_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.bind((HOST, 0))
    return s


def flood_worker(port: int, rate: float, seconds: float, seed: int) -> None:
    """Send about ``rate`` datagrams/s to 127.0.0.1:``port`` for ``seconds``; print a JSON line."""
    rng = random.Random(seed)
    data = payloads(rng)
    socks = [new_socket() for _ in range(SOCKETS)]
    ports: set[int] = set()
    dest = (HOST, port)
    sent = failed = 0
    t0 = time.monotonic()
    end = t0 + seconds
    try:
        while True:
            now = time.monotonic()
            if now >= end:
                break
            due = (now - t0) * rate
            if sent + failed >= due:  # ahead of schedule
                time.sleep(min(BATCH / rate, end - now))
                continue
            for _ in range(BATCH):
                i = (sent + failed) % SWAP_EVERY
                if i == 0:  # a fresh source port
                    k = rng.randrange(SOCKETS)
                    ports.add(socks[k].getsockname()[1])
                    socks[k].close()
                    socks[k] = new_socket()
                try:
                    socks[rng.randrange(SOCKETS)].sendto(data[rng.randrange(len(data))], dest)
                    sent += 1
                except OSError:  # ENOBUFS/EAGAIN: counted, not retried
                    failed += 1
    finally:
        for s in socks:
            ports.add(s.getsockname()[1])
            s.close()
    elapsed = time.monotonic() - t0
    print(json.dumps({"sent": sent, "failed": failed, "elapsed": elapsed,
                      "source_ports": len(ports)}), flush=True)


# --------------------------------------------------------------------------- daemon


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


@contextlib.contextmanager
def running_daemon(state: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """`dhtnode run` on 127.0.0.1 with JSON logs in STATE/log, as tests/daemon.py starts it."""
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    log = state / "log"
    with log.open("wb") as f:
        p = subprocess.Popen(
            [PY, "-m", "dhtnode", "run", "--state-dir", str(state), "--port", "0",
             "--log-format", "json", "--host", HOST, "--bootstrap-node"],
            stderr=f, stdout=subprocess.DEVNULL,
        )
    try:
        port = None
        deadline = time.monotonic() + 15
        while port is None and time.monotonic() < deadline and p.poll() is None:
            for line in log.read_text().splitlines():
                if '"node_started"' in line:
                    port = int(json.loads(line)["bind"].rsplit(":", 1)[1])
            time.sleep(0.05)
        if port is None:
            raise RuntimeError(f"daemon did not start: {log.read_text()}")
        yield p, port
    finally:
        stop(p)


def udp_snmp() -> dict[str, int]:
    """System-wide UDP counters (/proc/net/snmp): datagrams the kernel dropped, for example."""
    rows = [ln.split()[1:] for ln in Path("/proc/net/snmp").read_text().splitlines()
            if ln.startswith("Udp:")]
    return {k: int(v) for k, v in zip(rows[0], rows[1], strict=True)} if len(rows) >= 2 else {}


def socket_drops(port: int) -> int | None:
    """Datagrams the kernel dropped at the daemon's own UDP socket (the `drops` column of
    /proc/net/udp: its receive buffer was full)."""
    for ln in Path("/proc/net/udp").read_text().splitlines()[1:]:
        f = ln.split()
        if f[1].upper() == f"0100007F:{port:04X}":
            return int(f[-1])
    return None


def status(state: Path) -> dict[str, Any]:
    out = subprocess.run([PY, "-m", "dhtnode", "status", "--state-dir", str(state), "--json"],
                         capture_output=True, timeout=30, check=True)
    return dict(json.loads(out.stdout))


# --------------------------------------------------------------------------- legitimate client


@dataclass
class Pings:
    sent: int = 0
    rtts_ms: list[float] = field(default_factory=list)
    failed: int = 0

    @property
    def answered(self) -> int:
        return len(self.rtts_ms)


async def ping_phase(ep: NodeEndpoint, addr: tuple[str, int], seconds: float,
                     rss: list[int], pid: int) -> Pings:
    """PING ``addr`` at PING_RATE/s for ``seconds`` (each ping with the node's own retries);
    samples the daemon's RSS once a second into ``rss``."""
    res = Pings()

    async def one() -> None:
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(ep.run(lambda n: n.ping(addr)), PING_TIMEOUT_S)
        except (DhtnodeError, TimeoutError):
            res.failed += 1
            return
        res.rtts_ms.append((time.monotonic() - t0) * 1000)

    tasks: list[asyncio.Task[None]] = []
    t0 = time.monotonic()
    next_rss = t0
    while (elapsed := time.monotonic() - t0) < seconds:
        tasks.append(asyncio.create_task(one()))
        res.sent += 1
        if time.monotonic() >= next_rss:
            with contextlib.suppress(OSError, RuntimeError):
                rss.append(rss_kb(pid))
            next_rss += 1.0
        await asyncio.sleep(max(0.0, res.sent / PING_RATE - elapsed))
    await asyncio.gather(*tasks)
    return res


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def describe(name: str, p: Pings) -> str:
    share = 100.0 * p.answered / max(p.sent, 1)
    med = statistics.median(p.rtts_ms) if p.rtts_ms else float("nan")
    return (f"{name:<16}{p.sent:>7}{p.answered:>9}{share:>9.2f}%"
            f"{med:>12.3f}{pct(p.rtts_ms, 0.95):>10.3f}"
            f"{max(p.rtts_ms, default=float('nan')):>10.3f}")


# --------------------------------------------------------------------------- main


async def bench(args: argparse.Namespace, state: Path) -> None:
    with running_daemon(state) as (daemon, port):
        addr = (HOST, port)
        flooders: list[subprocess.Popen[bytes]] = []
        ep: NodeEndpoint | None = None
        try:
            print(f"# daemon pid {daemon.pid} on {HOST}:{port}; flood {args.rate:.0f} "
                  f"datagrams/s for {args.seconds:.0f} s from {args.workers} processes; "
                  f"pings {PING_RATE:.0f}/s", flush=True)
            node = DhtNode(Identity.generate(), DhtParams(), now=time.monotonic(), wall=time.time,
                           seeds=[])
            ep = await NodeEndpoint.create_on(open_udp_socket(HOST, 0), node)
            await asyncio.sleep(0.5)
            before = status(state)
            rss: list[int] = []
            snmp0 = udp_snmp()
            rss_start = rss_kb(daemon.pid)
            baseline = await ping_phase(ep, addr, BASELINE_S, rss, daemon.pid)
            rss_start = max(rss_start, rss_kb(daemon.pid))  # after the warm-up pings
            rss.clear()
            flooders = [
                subprocess.Popen([PY, __file__, "--flood-worker", str(port),
                                  str(args.rate / args.workers), str(args.seconds), str(i)],
                                 stdout=subprocess.PIPE)
                for i in range(args.workers)
            ]
            during = await ping_phase(ep, addr, args.seconds, rss, daemon.pid)
            reports = []
            for f in flooders:
                out, _ = f.communicate(timeout=args.seconds + 30)
                reports.append(json.loads(out.decode().strip().splitlines()[-1]))
            snmp1 = udp_snmp()
            drops = socket_drops(port)
            await asyncio.sleep(1.0)
            alive = daemon.poll() is None
            after_pings = await ping_phase(ep, addr, 2.0, rss, daemon.pid) if alive else Pings()
            rss_end = rss_kb(daemon.pid) if alive else 0
            after = status(state) if alive else {}
        finally:
            for f in flooders:
                stop(f)
            if ep is not None:
                ep.close()

    sent = sum(r["sent"] for r in reports)
    failed = sum(r["failed"] for r in reports)
    elapsed = max(r["elapsed"] for r in reports)
    print(f"flood: {sent} datagrams sent in {elapsed:.1f} s = {sent / elapsed:,.0f}/s "
          f"(target {args.rate:,.0f}/s); {failed} sends refused by the kernel; "
          f"{sum(r['source_ports'] for r in reports)} source ports used")
    print("kernel UDP counters over the run (system-wide, /proc/net/snmp): "
          + ", ".join(f"{k} +{snmp1.get(k, 0) - snmp0.get(k, 0):,}"
                      for k in ("InDatagrams", "RcvbufErrors", "InErrors", "SndbufErrors")))
    print(f"kernel drops at the daemon's socket (receive buffer full): {drops}; other "
          "RcvbufErrors are elsewhere (most likely the flood sockets' 4 kB buffers, which "
          "nobody reads, filling with the daemon's replies: see tx below)")
    print(f"daemon RSS: start {rss_start / 1024:.1f} MB, peak during flood "
          f"{max(rss, default=0) / 1024:.1f} MB, end {rss_end / 1024:.1f} MB, "
          f"end - start {(rss_end - rss_start) / 1024:+.1f} MB (target within 10 MB)")
    step = max(1, len(rss) // 12)
    print(f"daemon RSS during the flood, MB, one sample every {step} s: "
          + " ".join(f"{x / 1024:.1f}" for x in rss[::step]))
    print(f"{'pings':<16}{'sent':>7}{'answered':>9}{'share':>10}"
          f"{'median ms':>12}{'p95 ms':>10}{'max ms':>10}")
    print(describe("before flood", baseline))
    print(describe("during flood", during))
    print(describe("after flood", after_pings))
    share = during.answered / max(during.sent, 1)
    print(f"legitimate pings answered during the flood: {100 * share:.2f}% (target >= 99%): "
          f"{'OK' if share >= 0.99 else 'BELOW TARGET'}")
    b_stats, a_stats = before.get("stats", {}), after.get("stats", {})
    print("daemon counters (status --json, end - start; start was before the baseline pings):")
    keys = sorted(k for k in set(a_stats) | set(b_stats)
                  if k.startswith(("drop_", "rx_")) or k in ("receive_error", "tx"))
    for k in keys:
        d = a_stats.get(k, 0) - b_stats.get(k, 0)
        if d or k.startswith("rx_"):
            print(f"  {k:<28}{d:>12,}")
    nonzero = [k for k in keys if k.startswith("drop_") and a_stats.get(k, 0) != b_stats.get(k, 0)]
    print(f"  ({len([k for k in keys if k.startswith('drop_')])} drop_* counters, "
          f"{len(nonzero)} nonzero; the rest stayed 0)")
    answering = after_pings.answered > 0
    state_txt = "alive" if alive else f"DEAD (exit {daemon.returncode})"
    print(f"daemon at the end: {state_txt}, "
          f"{'answering' if answering else 'NOT answering'} "
          f"({after_pings.answered}/{after_pings.sent} pings after the flood)")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--flood-worker":
        port, rate, seconds, seed = sys.argv[2:6]
        flood_worker(int(port), float(rate), float(seconds), int(seed))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="flood duration (default 60)")
    ap.add_argument("--quick", action="store_true", help="a 10 s flood")
    ap.add_argument("--rate", type=float, default=50_000.0, help="datagrams/s in all")
    ap.add_argument("--workers", type=int, default=2, help="flood processes")
    args = ap.parse_args()
    if args.quick:
        args.seconds = 10.0
    args.seconds = max(1.0, min(args.seconds, 600.0))
    args.workers = max(1, min(args.workers, os.cpu_count() or 1, 16))
    with tempfile.TemporaryDirectory(prefix="bench-flood-") as d:
        asyncio.run(bench(args, Path(d) / "state"))


if __name__ == "__main__":
    main()
