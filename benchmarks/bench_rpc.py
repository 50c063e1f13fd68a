"""Requests per second one node serves on one core: PING and FIND_NODE, uvloop and asyncio.

The server (benchmarks/rpc_server.py) runs in its own process; a load process keeps
IN_FLIGHT requests outstanding on loopback for DURATION seconds. Server CPU per reply comes
from the server's own user+system time. A bare UDP echo server on the same loop runs side by
side as the baseline (ratio = our CPU per reply / echo's). Reference: HyperDHT 6.34.0 measured
10.5 us per FIND_NODE reply on this kind of machine (shared/targets.md).

Only 127.0.0.1 is used; every loop is bounded by DURATION.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dhtnode.wire import messages as m

DURATION = float(os.environ.get("BENCH_DURATION", "3.0"))
IN_FLIGHT = 16
HERE = Path(__file__).resolve().parent


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def requests(command: m.Command) -> list[bytes]:
    """Distinct random targets, as real lookups have (no answer can be cached)."""
    rng = random.Random(5)
    return [
        m.encode_request(
            m.Request(command, tid, None,
                      rng.randbytes(32) if command is m.Command.FIND_NODE else None)
        )
        for tid in range(4096)
    ]


def load(port: int, payloads: list[bytes]) -> int:
    """Keep IN_FLIGHT requests outstanding for DURATION seconds; returns replies received."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    s.connect(("127.0.0.1", port))
    s.settimeout(0.2)
    got = 0
    i = 0
    for _ in range(IN_FLIGHT):
        s.send(payloads[i % len(payloads)])
        i += 1
    end = time.monotonic() + DURATION
    while time.monotonic() < end:
        try:
            s.recv(2048)
            got += 1
        except TimeoutError:
            for _ in range(IN_FLIGHT):  # refill after a loss
                s.send(payloads[i % len(payloads)])
                i += 1
            continue
        s.send(payloads[i % len(payloads)])
        i += 1
    s.close()
    return got


def run(mode: str, command: m.Command) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as d:
        port_file = Path(d) / "port"
        proc = subprocess.Popen([sys.executable, str(HERE / "rpc_server.py"), mode, str(port_file)])
        try:
            deadline = time.monotonic() + 10
            while not port_file.exists() or not port_file.read_text():
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"benchmark server {mode} did not start")
                time.sleep(0.02)
            port = int(port_file.read_text())
            payloads = requests(command) if not mode.startswith("echo") else [b"\x10" * 48]
            load(port, payloads[:IN_FLIGHT])  # warm-up
            cpu0 = cpu_seconds(proc.pid)
            t0 = time.monotonic()
            replies = load(port, payloads)
            elapsed = time.monotonic() - t0
            cpu = cpu_seconds(proc.pid) - cpu0
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    return replies / elapsed, cpu / max(replies, 1) * 1e6


def main() -> None:
    print(f"# RPC throughput, loopback, {IN_FLIGHT} in flight, {DURATION:.0f} s per row")
    print(f"{'server':<16}{'request':<11}{'replies/s':>11}{'CPU us/reply':>14}{'vs echo':>9}")
    for loop in ("uvloop", "asyncio"):
        echo_rate, echo_cpu = run(f"echo-{loop}", m.Command.PING)
        print(f"{'echo-' + loop:<16}{'(echo)':<11}{echo_rate:>11.0f}{echo_cpu:>14.1f}{1.0:>9.2f}")
        for cmd in (m.Command.PING, m.Command.FIND_NODE):
            rate, cpu = run(loop, cmd)
            print(f"{loop:<16}{cmd.name:<11}{rate:>11.0f}{cpu:>14.1f}{cpu / echo_cpu:>9.2f}")
    print("# reference: HyperDHT 6.34.0 FIND_NODE 10.5 us/reply (65.8k replies/s)")


if __name__ == "__main__":
    main()
