#!/bin/sh
# Entrypoint of the dhtnode image: `dhtnode run` with flags taken from the environment, then
# any arguments given to the container (they win). The daemon replaces this shell (exec), so
# it is PID 1 and gets SIGTERM from `docker stop` directly.
#
#   DHTNODE_CONFIG        TOML config file (e.g. a bind-mounted /etc/dhtnode/config.toml)
#   DHTNODE_STATE_DIR     state dir (default /var/lib/dhtnode, the image's volume)
#   DHTNODE_BOOTSTRAP     HOST:PORT list, separated by commas or spaces
#   DHTNODE_HOST, DHTNODE_PORT, DHTNODE_PUBLIC_HOST, DHTNODE_LOG_LEVEL, DHTNODE_LOG_FORMAT
#   DHTNODE_BOOTSTRAP_NODE=1   serve at once as a bootstrap node (with DHTNODE_PUBLIC_HOST)
#   DHTNODE_DEFAULT_ROUTE=IP   (swarm tests) replace the default route with IP first ("none":
#                              delete it); needs
#                              the container started as root with NET_ADMIN; the daemon then
#                              runs as user dhtnode without capabilities.
set -eu

case "${DHTNODE_DEFAULT_ROUTE:-}" in
    "") ;;
    none) ip route del default 2>/dev/null || true ;;
    *) ip route replace default via "$DHTNODE_DEFAULT_ROUTE" ;;
esac

set -- run "$@"
[ -n "${DHTNODE_CONFIG:-}" ] && set -- "$@" --config "$DHTNODE_CONFIG"
[ -n "${DHTNODE_HOST:-}" ] && set -- "$@" --host "$DHTNODE_HOST"
[ -n "${DHTNODE_PORT:-}" ] && set -- "$@" --port "$DHTNODE_PORT"
[ -n "${DHTNODE_PUBLIC_HOST:-}" ] && set -- "$@" --public-host "$DHTNODE_PUBLIC_HOST"
[ -n "${DHTNODE_LOG_LEVEL:-}" ] && set -- "$@" --log-level "$DHTNODE_LOG_LEVEL"
[ -n "${DHTNODE_LOG_FORMAT:-}" ] && set -- "$@" --log-format "$DHTNODE_LOG_FORMAT"
case "${DHTNODE_BOOTSTRAP_NODE:-}" in 1|true|yes) set -- "$@" --bootstrap-node ;; esac
for b in $(echo "${DHTNODE_BOOTSTRAP:-}" | tr ',' ' '); do
    set -- "$@" --bootstrap "$b"
done

if [ "$(id -u)" = 0 ] && id dhtnode >/dev/null 2>&1; then
    # Never run the daemon as root: drop to the image's user and all capabilities.
    chown dhtnode:dhtnode "${DHTNODE_STATE_DIR:-/var/lib/dhtnode}" 2>/dev/null || true
    exec setpriv --reuid=dhtnode --regid=dhtnode --init-groups \
        --inh-caps=-all --bounding-set=-all dhtnode "$@"
fi
exec dhtnode "$@"
