"""Announce a topic from one node and find it from another.

    python examples/announce_lookup.py 203.0.113.7:49200
"""

import asyncio
import sys

import dhtnode


async def main(bootstrap: str) -> None:
    topic = dhtnode.topic_from_name("examples/announce-lookup")
    async with dhtnode.open_node([bootstrap]) as alice, dhtnode.open_node([bootstrap]) as bob:
        stored = await alice.announce(topic)  # kept refreshed until alice closes
        print(f"alice announced on {stored} nodes as {alice.public_key.hex()}")
        found = await bob.lookup(topic)
        for rec in found:
            print(f"bob found {rec.public_key.hex()} direct={list(rec.direct)}")
        assert any(rec.public_key == alice.public_key for rec in found)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
