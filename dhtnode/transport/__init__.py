"""The thin asyncio layer: moves datagrams and timers between one UDP socket and the core."""
