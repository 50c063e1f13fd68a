"""Optional Prometheus metrics (``dhtnode run --metrics 127.0.0.1:9464``, or ``[metrics]
listen``): ``GET /metrics`` on a small asyncio HTTP server, exposition by ``prometheus_client``.

Imported only when metrics are on (``prometheus_client`` is not loaded otherwise). Values are
read from the node at scrape time, on the event loop's own thread (no locking: the engine is
single-threaded), except two things counted as they happen: datagrams by kind (the first byte,
as ``wire/demux.py`` classifies it; the node socket only, not punch sockets) and the RPC latency
histogram (first send to matched answer, retransmissions included).

Names: ``dhtnode_datagrams_received_total{kind}``, ``dhtnode_datagrams_sent_total{kind}``,
``dhtnode_drops_total{reason}`` (every ``drop_*`` counter of the node's stats),
``dhtnode_events_total{name}`` (the other counters), ``dhtnode_rpc_latency_seconds{command}``,
``dhtnode_routing_table_nodes``, ``dhtnode_records_stored``, ``dhtnode_topics_stored``,
``dhtnode_announced_topics``, ``dhtnode_serving``, ``dhtnode_reachable``,
``dhtnode_connections{path}``, ``dhtnode_punch_total{outcome}``, ``dhtnode_uptime_seconds``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from dhtnode.wire import messages as m
from dhtnode.wire.address import parse_host_port

#: Datagram kind by the high nibble of its first byte (``wire/demux.py``'s ranges).
_KIND_BY_NIBBLE = ("stun", "dht", "punch", "relay", *("quic",) * 4, *("unknown",) * 4,
                   *("quic",) * 4)
_KINDS = tuple(dict.fromkeys(_KIND_BY_NIBBLE))
#: Counters shown as their own metric, not among events.
_PUNCH = {"punch_ok": "ok", "punch_failed": "failed"}
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class _NodeCollector(Collector):
    def __init__(self, status: Callable[[], dict[str, Any]], rx: list[int], tx: list[int],
                 started: float) -> None:
        self._status = status
        self._rx = rx
        self._tx = tx
        self._started = started

    def collect(self) -> Iterator[Any]:
        st = self._status()
        stats: dict[str, int] = st.get("stats", {})
        for name, counts, what in (("received", self._rx, "received on"),
                                   ("sent", self._tx, "sent from")):
            fam = CounterMetricFamily(f"dhtnode_datagrams_{name}",
                                      f"UDP datagrams {what} the node socket, by kind",
                                      labels=["kind"])
            by_kind = dict.fromkeys(_KINDS, 0)
            for nibble, n in enumerate(counts):
                by_kind[_KIND_BY_NIBBLE[nibble]] += n
            for kind, n in by_kind.items():
                fam.add_metric([kind], n)
            yield fam
        drops = CounterMetricFamily("dhtnode_drops", "Datagrams and requests dropped, by reason",
                                    labels=["reason"])
        events = CounterMetricFamily("dhtnode_events", "Other counters of the node's stats",
                                     labels=["name"])
        punch = CounterMetricFamily("dhtnode_punch", "Hole punch outcomes", labels=["outcome"])
        for outcome in _PUNCH.values():
            punch.add_metric([outcome], stats.get(f"punch_{outcome}", 0))
        for key, n in sorted(stats.items()):
            if key.startswith("drop_"):
                drops.add_metric([key[5:]], n)
            elif key not in _PUNCH:
                events.add_metric([key], n)
        yield drops
        yield events
        yield punch
        gauges: list[tuple[str, str, float]] = [
            ("routing_table_nodes", "Nodes in the routing table", st.get("routing_table_size", 0)),
            ("records_stored", "Records stored for others", st.get("records_stored", 0)),
            ("topics_stored", "Topics with stored records", st.get("topics_stored", 0)),
            ("announced_topics", "Topics this node announces",
             len(st.get("announced_topics", ()))),
            ("serving", "1 while the node serves the DHT (server mode)",
             int(bool(st.get("server")))),
            ("reachable", "1 while strangers can reach the node", int(bool(st.get("reachable")))),
            ("requests_in_flight", "DHT requests awaiting an answer",
             st.get("requests_in_flight", 0)),
            ("uptime_seconds", "Seconds since the daemon started", time.time() - self._started),
        ]
        for name, doc, value in gauges:
            g = GaugeMetricFamily(f"dhtnode_{name}", doc)
            g.add_metric([], float(value))
            yield g
        conns = GaugeMetricFamily("dhtnode_connections", "Open connections by path",
                                  labels=["path"])
        by_path = {"direct": 0, "relayed": 0}
        for c in st.get("connections", ()):
            path = str(c.get("path", "direct"))
            by_path[path] = by_path.get(path, 0) + 1
        for path, n in by_path.items():
            conns.add_metric([path], n)
        yield conns


class MetricsServer:
    """Serves ``/metrics`` for one node endpoint. ``status`` returns the daemon's status dict
    (``DhtNode.status()`` plus services)."""

    def __init__(self, listen: str, endpoint: Any, status: Callable[[], dict[str, Any]],
                 started: float) -> None:
        self.host, self.port = parse_host_port(listen)
        self.registry = CollectorRegistry(auto_describe=False)
        self._rx = [0] * 16
        self._tx = [0] * 16
        self.registry.register(_NodeCollector(status, self._rx, self._tx, started))
        self.latency = Histogram("dhtnode_rpc_latency_seconds",
                                 "DHT request round trips: first send to matched answer",
                                 ["command"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self._server: asyncio.base_events.Server | None = None
        self._hook(endpoint)

    def _hook(self, endpoint: Any) -> None:
        """Count datagrams by kind and time RPCs: wraps the endpoint's two datagram paths
        (only when metrics are on; nothing changes otherwise)."""
        rx, tx = self._rx, self._tx
        receive, send = endpoint.datagram_received, endpoint.sendto

        def counted_receive(data: bytes, addr: tuple[Any, ...]) -> None:
            rx[data[0] >> 4 if data else 0] += 1
            receive(data, addr)

        def counted_send(data: bytes, addr: Any) -> None:
            tx[data[0] >> 4 if data else 0] += 1
            send(data, addr)

        setattr(endpoint, "datagram_received", counted_receive)  # noqa: B010
        setattr(endpoint, "sendto", counted_send)  # noqa: B010
        latency = self.latency

        def on_rtt(command: m.Command, seconds: float) -> None:
            latency.labels(command.name.lower()).observe(max(0.0, seconds))

        endpoint.node.rpc.on_rtt = on_rtt

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        sock = self._server.sockets[0].getsockname()
        return sock[0], sock[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5.0)
            while True:  # the headers: not needed
                h = await asyncio.wait_for(reader.readline(), 5.0)
                if h in (b"\r\n", b"\n", b""):
                    break
            parts = line.decode("latin-1").split()
            if len(parts) < 2 or parts[0] not in ("GET", "HEAD"):
                status, body, ctype = "405 Method Not Allowed", b"GET only\n", "text/plain"
            elif parts[1].split("?")[0] not in ("/metrics", "/"):
                status, body, ctype = "404 Not Found", b"see /metrics\n", "text/plain"
            else:
                status, body, ctype = "200 OK", generate_latest(self.registry), CONTENT_TYPE_LATEST
            head = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
            writer.write(head + (b"" if parts and parts[0] == "HEAD" else body))
            await writer.drain()
        except (OSError, TimeoutError, ValueError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
