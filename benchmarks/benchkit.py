"""Helpers the benchmark scripts share (imported as a sibling module: the scripts run as
files, so their own folder is on ``sys.path``): percentiles, stopping a process, and a bulk
transfer measured against a receiver that counts what arrived."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import time
from typing import Any

#: Bytes per write and read in the bulk transfers.
CHUNK = 65536


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of ``values``."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def stop(p: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM (a clean shutdown), then SIGKILL after ``timeout`` seconds."""
    if p.poll() is not None:
        return
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


async def sink(reader: asyncio.StreamReader, writer: Any) -> None:
    """Read to EOF, then answer with the byte count (the sender's clock stops on it)."""
    n = 0
    while data := await reader.read(CHUNK):
        n += len(data)
    writer.write(b"%d" % n)
    await writer.drain()
    writer.write_eof()


async def send_bulk(reader: asyncio.StreamReader, writer: Any, total: int) -> float:
    """Send ``total`` bytes, wait for the receiver's count; returns MB/s."""
    block = os.urandom(CHUNK)
    t0 = time.perf_counter()
    sent = 0
    while sent < total:
        writer.write(block)
        sent += len(block)
        await writer.drain()
    writer.write_eof()
    got = int(await asyncio.wait_for(reader.read(), 120))
    elapsed = time.perf_counter() - t0
    if got != total:
        raise RuntimeError(f"receiver counted {got} of {total} bytes")
    return total / elapsed / 1e6
