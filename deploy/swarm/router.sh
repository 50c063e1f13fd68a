#!/bin/sh
# A NAT router container of the swarm: nftables NAT between its WAN interface (the one with an
# address in $WAN_PREFIX, the "internet") and its LAN interface, like tests/netlab.py.
#   port-restricted  plain masquerade: endpoint-independent mapping, address-and-port filtering
#   symmetric        masquerade fully-random: a random port per destination
# Needs NET_ADMIN and net.ipv4.ip_forward=1 (compose: cap_add, sysctls). Runs as root.
set -eu
KIND=${1:?usage: router.sh port-restricted|symmetric}
WAN_PREFIX=${WAN_PREFIX:-203.0.113.}

wan=$(ip -o -4 addr show | awk -v p="$WAN_PREFIX" 'index($4, p) == 1 { print $2; exit }')
lan=$(ip -o -4 addr show | awk -v w="$wan" '$2 != "lo" && $2 != w { print $2; exit }')
[ -n "$wan" ] && [ -n "$lan" ] || { echo "router: no WAN ($wan) or LAN ($lan) interface" >&2; exit 1; }
case "$KIND" in
    port-restricted) post="oifname \"$wan\" masquerade" ;;
    symmetric)       post="oifname \"$wan\" masquerade fully-random" ;;
    *) echo "router: unknown kind $KIND" >&2; exit 2 ;;
esac
# No default route: the router reaches only its two networks (never the host's interfaces).
ip route del default 2>/dev/null || true

nft -f - <<NFT
table ip swarm_nat {
  chain post { type nat hook postrouting priority srcnat; $post; }
}
table ip swarm_filter {
  chain forward { type filter hook forward priority filter; policy drop;
    iifname "$lan" oifname "$wan" accept;
    iifname "$wan" oifname "$lan" ct state established,related accept;
  }
  chain input { type filter hook input priority filter;
    iifname "$wan" ct state new drop;
  }
}
NFT
echo "router $KIND: wan $wan, lan $lan"
trap 'nft delete table ip swarm_nat; nft delete table ip swarm_filter; exit 0' TERM INT
while :; do sleep 3600 & wait $! || true; done
