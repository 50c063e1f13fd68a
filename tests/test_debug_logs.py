"""The sampled per-request debug trace (issue 8): at log level debug every request received
and every answer to (or timeout of) our own requests shows as ``rpc_request`` / ``rpc_reply``
with command, peer and outcome, at most ``RPC_LOG_RATE`` per second (plus a burst), and what
the budget left out is counted in a periodic ``rpc_log_suppressed``. Off, nothing is built."""

from __future__ import annotations

import asyncio
import io
import json
import random
import socket
import time
from typing import Any

from dhtnode.crypto.identity import Identity
from dhtnode.daemon.config import Config, LogConfig
from dhtnode.daemon.logging import configure_logging
from dhtnode.daemon.wiring import log_event, params_from_config
from dhtnode.dht.ids import node_id_for
from dhtnode.dht.node import DhtNode, DhtParams
from dhtnode.dht.rpc import RPC_LOG_BURST, RPC_LOG_RATE, RPC_LOG_REPORT_INTERVAL
from dhtnode.transport.udp import NodeEndpoint, open_udp_socket
from dhtnode.wire import messages as m

NODE = ("198.51.100.1", 4000)
FLOOD = 1000


def _node(trace: bool) -> DhtNode:
    return DhtNode(Identity.from_seed(b"\x02" * 32), DhtParams(rpc_trace=trace), now=0.0,
                   wall=lambda: 1_800_000_000.0, rng=random.Random(1), public_address=NODE)


def _events(node: DhtNode, name: str) -> list[dict[str, Any]]:
    return [f for n, f in node.events if n == name]


def _flood(node: DhtNode, seconds: float) -> None:
    for i in range(FLOOD):
        src = (f"203.0.{i // 250}.{i % 250 + 1}", 5000 + i)
        node.receive(m.encode_request(m.Request(m.Command.PING, i)), src,
                     1.0 + seconds * i / FLOOD)
        node.datagrams_to_send()


def test_a_flood_of_pings_yields_at_most_the_budget() -> None:
    node = _node(True)
    _flood(node, 0.5)
    shown = _events(node, "rpc_request")
    assert shown, "debug trace on, yet no rpc_request event"
    assert len(shown) <= RPC_LOG_BURST + RPC_LOG_RATE * 0.5
    assert shown[0] == {"command": "PING", "peer": "203.0.0.1:5000", "outcome": "answered"}
    # What the budget left out is reported once the report interval has passed.
    node.handle_timer(1.5 + RPC_LOG_REPORT_INTERVAL)
    reports = _events(node, "rpc_log_suppressed")
    assert [r["count"] for r in reports] == [FLOOD - len(shown)]


def test_trace_off_emits_nothing() -> None:
    node = _node(False)
    _flood(node, 0.5)
    node.handle_timer(100.0)
    assert not [n for n, _ in node.events if n.startswith("rpc_")]


def test_outcomes_of_requests_and_replies() -> None:
    node = _node(True)
    src = ("203.0.113.9", 7000)
    # FIND_NODE answers through its own hot path; ANNOUNCE without a token is refused.
    node.receive(m.encode_request(m.Request(m.Command.FIND_NODE, 1, target=bytes(32))), src, 1.0)
    node.receive(m.encode_request(m.Request(m.Command.ANNOUNCE, 2, target=bytes(32),
                                            value=b"x")), src, 1.0)
    node.receive(m.encode_request(m.Request(m.Command.PROBE, 3, value=bytes(16))), src, 1.0)
    outcomes = [(e["command"], e["outcome"]) for e in _events(node, "rpc_request")]
    assert outcomes == [("FIND_NODE", "answered"), ("ANNOUNCE", "error:missing_field"),
                        ("PROBE", "unanswered")]
    # Our own requests: one answered, one timing out.
    peer, silent = ("203.0.113.20", 7100), ("203.0.113.21", 7100)
    node.handle_timer(2.0)
    node.ping(peer)
    node.ping(silent)
    sent = {a: m.decode(d) for d, a in node.datagrams_to_send()}
    req = sent[peer]
    assert isinstance(req, m.Request)
    answer = m.Response(m.Command.PING, req.tid, NODE, node_id_for(peer))
    node.receive(m.encode_response(answer), peer, 2.05)
    node.handle_timer(3.5)  # the timeout: one retry
    node.handle_timer(10.0)  # ... and its timeout
    replies = {(e["peer"], e["outcome"]) for e in _events(node, "rpc_reply")}
    assert replies == {("203.0.113.20:7100", "ok"), ("203.0.113.21:7100", "timeout")}
    assert all("rtt_ms" in e for e in _events(node, "rpc_reply"))


def test_the_daemon_traces_only_at_debug_level() -> None:
    assert params_from_config(Config(log=LogConfig(level="debug"))).rpc_trace
    assert not params_from_config(Config()).rpc_trace
    for level, shown in (("info", False), ("debug", True)):
        out = io.StringIO()
        configure_logging(level, "json", stream=out)
        log_event("rpc_request", {"command": "PING", "peer": "[::1]:5", "outcome": "answered"})
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        assert bool(lines) is shown
        if shown:
            assert lines[0]["event"] == "rpc_request" and lines[0]["level"] == "debug"
    configure_logging("warning", "json", stream=io.StringIO())


async def test_real_socket_flood_at_debug_level() -> None:
    """1,000 pings over loopback to a node tracing at debug level: the events handed to the
    logger stay within the budget for the time the flood took."""
    events: list[str] = []
    sock = open_udp_socket("127.0.0.1", 0)
    node = DhtNode(Identity.generate(), DhtParams(rpc_trace=True), now=time.monotonic(),
                   wall=time.time, public_address=sock.getsockname()[:2])
    ep = await NodeEndpoint.create_on(sock, node, on_event=lambda n, f: events.append(n))
    try:
        start = time.monotonic()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setblocking(False)
            for i in range(FLOOD):
                s.sendto(m.encode_request(m.Request(m.Command.PING, i)), ep.local_address)
                if i % 100 == 99:
                    await asyncio.sleep(0.005)  # within the socket buffer
            deadline = time.monotonic() + 5
            while node.stats["rx_request"] < FLOOD and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        elapsed = time.monotonic() - start
        assert node.stats["rx_request"] == FLOOD
        traced = events.count("rpc_request")
        assert 0 < traced <= RPC_LOG_BURST + RPC_LOG_RATE * elapsed + 1
    finally:
        ep.close()
