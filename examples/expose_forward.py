"""Expose a local TCP service under a key, and reach it through a forwarded local port.

    python examples/expose_forward.py 203.0.113.7:49200
"""

import asyncio
import sys

import dhtnode


async def upper(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write((await reader.read(1024)).upper())  # the "service": upper-cases a line
    await writer.drain()
    writer.close()


async def main(bootstrap: str) -> None:
    service = await asyncio.start_server(upper, "127.0.0.1", 0)
    target = service.sockets[0].getsockname()[:2]
    async with dhtnode.open_node([bootstrap]) as home, dhtnode.open_node([bootstrap]) as away:
        key = await home.expose(target, identity=dhtnode.Identity.generate(),
                                allow=[away.public_key])
        print(f"exposed {target[0]}:{target[1]} as {key.hex()}")
        host, port = await away.forward(key, ("127.0.0.1", 0))
        print(f"forwarding 127.0.0.1:{port} -> {key.hex()[:16]}...")
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"hello service\n")
        await writer.drain()
        print(f"service answered: {(await reader.read()).decode().strip()}")
        writer.close()
    service.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
