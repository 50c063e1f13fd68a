"""NAT concerns: STUN reflector and client, address observations, NAT classification."""
