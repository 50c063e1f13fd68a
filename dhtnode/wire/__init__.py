"""Wire formats: first-byte demultiplexing, STUN and DHT message codecs. Pure bytes in, bytes out."""
