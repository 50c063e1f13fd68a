"""Connecting two nodes: the sealed introduction sent through a DHT node (``handshake``) and
the reachability description each side sends inside it (``peerinfo``)."""
