"""dhtnode: a Kademlia DHT daemon with a STUN reflector and signed topic records."""

__version__ = "0.1.0"
