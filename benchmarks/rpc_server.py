"""Benchmark server: one DHT node on loopback with a 35-node routing table.

Usage: python benchmarks/rpc_server.py {uvloop|asyncio|echo-uvloop|echo-asyncio} PORT_FILE
Writes its port to PORT_FILE and serves until SIGTERM. The echo modes answer every datagram
with itself: the floor any UDP server on that event loop pays per reply.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

from dhtnode.crypto.identity import Identity
from dhtnode.dht.ids import node_id_for
from dhtnode.dht.node import DhtNode, DhtParams
from dhtnode.transport.udp import NodeEndpoint

TABLE_SIZE = 35


class Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.t.sendto(data, addr)  # type: ignore[attr-defined]


async def serve(mode: str, port_file: Path) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    if mode.startswith("echo"):
        transport, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
        port = transport.get_extra_info("sockname")[1]
    else:
        node = DhtNode(
            Identity.from_seed(b"\x07" * 32),
            DhtParams(),
            now=time.monotonic(),
            wall=time.time,
            public_address=("127.0.0.1", 1),
        )
        for i in range(TABLE_SIZE):
            a = (f"198.51.100.{i + 1}", 30000 + i)
            node.table.add(node_id_for(a), a, time.monotonic())
        ep = await NodeEndpoint.create(node, "127.0.0.1", 0)
        port = ep.local_address[1]
    port_file.write_text(str(port))
    await stop.wait()


def main() -> None:
    mode, port_file = sys.argv[1], Path(sys.argv[2])
    if "uvloop" in mode:
        import uvloop

        uvloop.run(serve(mode, port_file))
    else:
        asyncio.run(serve(mode, port_file))


if __name__ == "__main__":
    main()
