"""Serve a public key and connect to it by that key alone: an encrypted echo.

    python examples/listen_connect.py 203.0.113.7:49200
"""

import asyncio
import sys

import dhtnode


async def echo(conn: dhtnode.Connection) -> None:
    reader, writer = await conn.accept_stream()
    writer.write(await reader.read(1024))
    await writer.drain()
    writer.write_eof()


async def main(bootstrap: str) -> None:
    async with dhtnode.open_node([bootstrap]) as server, dhtnode.open_node([bootstrap]) as client:
        tasks = set()

        def on_connection(conn: dhtnode.Connection) -> None:
            task = asyncio.create_task(echo(conn))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        listening = await server.listen(on_connection)
        print(f"listening as {server.public_key.hex()}")
        conn = await client.connect(server.public_key)
        reader, writer = await conn.open_stream()
        writer.write(b"hello over dhtnode")
        writer.write_eof()
        print(f"echoed: {(await reader.read()).decode()} (path: {conn.path})")
        await conn.close()
        await listening.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
