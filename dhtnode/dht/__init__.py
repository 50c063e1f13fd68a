"""Kademlia DHT: node ids, routing table, RPC matching, lookups, records. Sans-I/O: no sockets, no asyncio."""
