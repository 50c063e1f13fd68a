"""Wire formats: first-byte demultiplexing, STUN and DHT codecs. Pure bytes in, bytes out."""
