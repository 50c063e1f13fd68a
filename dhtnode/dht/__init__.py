"""Kademlia DHT: ids, routing table, lookups, records, the node engine.

Sans-I/O: no sockets, no asyncio, no clock reads.
"""
