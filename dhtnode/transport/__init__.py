"""The thin asyncio layer that moves datagrams and timers between one UDP socket and the sans-I/O core."""
