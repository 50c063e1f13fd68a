"""Keys and MACs: Ed25519 identity, write tokens."""
