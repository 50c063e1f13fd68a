"""One QUIC stream on loopback: MB/s over several rounds, optionally under cProfile.

The set-up is bench_connect.py's part 3 (a 6-node DHT on 127.0.0.1 in this process, one
listener, one client connected by public key, uvloop), so the datagrams take the product's
real path: the node socket, the engine's send path and the QUIC bridge. Each round sends
``--mb`` MB one way on a fresh stream of one connection (the receiver answers with its byte
count at EOF, as in part 3) and prints MB/s; the median closes the run. Both ends run in
this one process and loop, so each figure pays for both.

``--profile N`` profiles the rounds with cProfile and prints the top N entries by own time
(tottime) and by cumulative time; profiling slows everything down, so compare shares, not
MB/s. "process busy" is this process's CPU time over the wall time: the transfer is
CPU-bound, so well below 100% means other processes took the CPU and the MB/s of that round
says little (compare the CPU seconds per round instead). ``--datagram-size`` is an experiment
only (both ends' QUIC max_datagram_size; the product sends 1200-byte datagrams). Nothing is
sent outside 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import statistics
import time

import uvloop
from bench_connect import Tasks, sink_streams
from benchkit import CHUNK, send_bulk, start_dht

from dhtnode.crypto.identity import Identity


async def run(
    mb: int, rounds: int, profile: int, datagram_size: int | None, profile_out: str | None
) -> None:
    peers = await start_dht(6)
    tasks = Tasks()
    try:
        server, client = peers[-1], peers[-2]
        if datagram_size is not None:  # an experiment: the product always uses 1200
            server.conns.bridge.max_datagram_size = datagram_size
            client.conns.bridge.max_datagram_size = datagram_size
        key = Identity.generate()
        await server.conns.listen(key, lambda conn: tasks.spawn(sink_streams(conn)))
        conn = await asyncio.wait_for(
            client.conns.connect(key.public_key, identity=Identity.generate()), 20)
        total = mb * 1_000_000 // CHUNK * CHUNK
        prof = cProfile.Profile() if profile else None
        rates: list[float] = []
        cpu0 = time.process_time()
        for i in range(rounds):
            reader, writer = await conn.open_stream()
            if prof is not None:
                prof.enable()
            c0 = time.process_time()
            rate = await send_bulk(reader, writer, total)
            busy = (time.process_time() - c0) / (total / rate / 1e6)
            if prof is not None:
                prof.disable()
            rates.append(rate)
            print(f"round {i + 1}: {total / 1e6:.1f} MB  {rate:8.1f} MB/s  "
                  f"(process busy {busy:.0%} of the wall time)", flush=True)
        cpu = time.process_time() - cpu0
        st = conn.quic.stats
        print(f"median {statistics.median(rates):8.1f} MB/s over {rounds} rounds; process CPU "
              f"{cpu / rounds:.2f} s per round; client sent {st.datagrams_out} datagrams "
              f"({st.bytes_out / max(st.datagrams_out, 1):.0f} bytes average), received "
              f"{st.datagrams_in}", flush=True)
        await conn.close()
        if prof is not None:
            for key_ in ("tottime", "cumulative"):
                out = io.StringIO()
                pstats.Stats(prof, stream=out).sort_stats(key_).print_stats(profile)
                print(out.getvalue())
            if profile_out:
                prof.dump_stats(profile_out)
    finally:
        tasks.cancel()
        for p in peers:
            await p.conns.close()
            p.ep.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=50, help="MB per round (default 50)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="profile with cProfile and print the top N entries")
    ap.add_argument("--datagram-size", type=int, default=None, metavar="BYTES",
                    help="experiment: QUIC max_datagram_size on both ends (product: 1200)")
    ap.add_argument("--profile-out", metavar="PATH", help="also save the cProfile stats here")
    args = ap.parse_args()
    uvloop.run(run(args.mb, args.rounds, args.profile, args.datagram_size, args.profile_out))


if __name__ == "__main__":
    main()
