# dhtnode in a container: `dhtnode run` as the entrypoint, state in a volume, config by file or
# environment (see deploy/swarm/docker-entrypoint.sh), health from `dhtnode status`.
#
# Offline build from wheels built on the host (no index is contacted inside the build):
#   pip wheel . -w wheels/
#   docker build -t dhtnode .                                  # base python:3.11-slim
#   docker build --build-arg BASE=local/debian-py:bookworm -t dhtnode .   # any base with python3 >= 3.11 and venv
# `make swarm` builds its own base from Debian packages (deploy/swarm/run.py).
#
# Run: docker run -d -p 49200:49200/udp -v dhtnode-state:/var/lib/dhtnode \
#        -e DHTNODE_BOOTSTRAP=HOST:49200 dhtnode
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
LABEL org.dhtnode.stage=build
COPY wheels/ /wheels/
RUN python3 -m venv /opt/dhtnode \
 && /opt/dhtnode/bin/pip install --no-index --find-links /wheels --no-cache-dir dhtnode \
 && /opt/dhtnode/bin/dhtnode --version

FROM ${BASE}
RUN (getent group dhtnode || groupadd --system --gid 10001 dhtnode) \
 && (getent passwd dhtnode || useradd --system --uid 10001 --gid dhtnode \
        --home-dir /var/lib/dhtnode --no-create-home --shell /usr/sbin/nologin dhtnode) \
 && mkdir -p /var/lib/dhtnode /etc/dhtnode \
 && chown dhtnode:dhtnode /var/lib/dhtnode && chmod 0700 /var/lib/dhtnode
COPY --from=build /opt/dhtnode /opt/dhtnode
COPY deploy/swarm/docker-entrypoint.sh /usr/local/bin/docker-entrypoint
RUN chmod 0755 /usr/local/bin/docker-entrypoint

ENV PATH=/opt/dhtnode/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    DHTNODE_STATE_DIR=/var/lib/dhtnode
VOLUME ["/var/lib/dhtnode"]
EXPOSE 49200/udp
USER dhtnode
WORKDIR /var/lib/dhtnode
# Asks the daemon over its control socket in the state dir (or the config's state_dir).
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD dhtnode status ${DHTNODE_CONFIG:+--config "$DHTNODE_CONFIG"} >/dev/null || exit 1
# The daemon is PID 1 (exec'd by the entrypoint) and handles SIGTERM itself: it unannounces,
# saves the node cache and exits.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/docker-entrypoint"]
CMD []
