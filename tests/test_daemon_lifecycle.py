"""A real `dhtnode run` on loopback: Prometheus metrics scraped and parsed with
prometheus_client's own parser (counters move with traffic), SIGHUP reloads log level,
bootstrap list and record limits (and logs what needs a restart), SIGTERM withdraws the
announcement, saves the node cache and exits within a few seconds (measured). Also the CLI's
control socket choice: --control, and the system service's socket as the fallback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dhtnode.cli import common
from dhtnode.daemon import control
from tests.daemon import running_daemon
from tests.procs import sigterm_timed

pytestmark = pytest.mark.slow


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[str, Any]:
    """{sample name + sorted labels: value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    out: dict[str, Any] = {}
    for fam in text_string_to_metric_families(text):
        assert fam.name.startswith("dhtnode_"), fam.name
        for s in fam.samples:
            key = s.name + "".join(f",{k}={v}" for k, v in sorted(s.labels.items()))
            out[key] = s.value
    return out


def log_events(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def wait_event(path: Path, name: str, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for e in log_events(path):
            if e.get("event") == name:
                return e
        time.sleep(0.05)
    raise AssertionError(f"no {name} in {path.read_text()[-3000:]}")


def write_config(path: Path, *, bootstrap: list[str], level: str, max_total: int,
                 metrics: int, port: int = 0) -> None:
    path.write_text(
        f'[node]\nhost = "127.0.0.1"\nport = {port}\nbootstrap = {json.dumps(bootstrap)}\n'
        f'[log]\nlevel = "{level}"\n[records]\nmax_total = {max_total}\n'
        f'[metrics]\nlisten = "127.0.0.1:{metrics}"\n'
    )


def test_metrics_reload_and_sigterm(tmp_path: Path) -> None:
    with running_daemon(tmp_path / "boot", "--host", "127.0.0.1", "--bootstrap-node",
                        "--public-host", "127.0.0.1") as boot_port, \
         running_daemon(tmp_path / "peer", "--host", "127.0.0.1",
                        "--bootstrap", f"127.0.0.1:{boot_port}") as peer_port:
        state = tmp_path / "node"
        state.mkdir(mode=0o700)
        cfg = tmp_path / "node.toml"
        mport = free_tcp_port()
        write_config(cfg, bootstrap=[f"127.0.0.1:{boot_port}"], level="info", max_total=1000,
                     metrics=mport)
        log = state / "log"
        with log.open("wb") as f:
            p = subprocess.Popen(
                [sys.executable, "-m", "dhtnode", "run", "--config", str(cfg), "--state-dir",
                 str(state), "--log-format", "json"], stderr=f, stdout=subprocess.DEVNULL)
        try:
            started = wait_event(log, "metrics_started")
            assert started["url"] == f"http://127.0.0.1:{mport}/metrics"
            wait_event(log, "bootstrap_done")
            sock = state / "control.sock"
            res = asyncio.run(control.request(sock, "announce", topic="ab" * 32))
            assert res["stored_on"] >= 1
            m = scrape(mport)
            assert m["dhtnode_datagrams_received_total,kind=dht"] > 0
            assert m["dhtnode_datagrams_sent_total,kind=dht"] > 0
            assert m["dhtnode_routing_table_nodes"] >= 1
            assert m["dhtnode_rpc_latency_seconds_count,command=announce"] >= 1
            assert m["dhtnode_punch_total,outcome=ok"] == 0
            assert m["dhtnode_connections,path=direct"] == 0
            assert m["dhtnode_serving"] in (0, 1) and m["dhtnode_reachable"] in (0, 1)
            # Traffic moves the counters; a malformed datagram is a drop by reason.
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(b"\x15garbage", ("127.0.0.1", _bind_port(log)))
            asyncio.run(control.request(sock, "lookup", topic="ab" * 32))
            time.sleep(0.2)
            m2 = scrape(mport)
            assert (m2["dhtnode_datagrams_received_total,kind=dht"]
                    > m["dhtnode_datagrams_received_total,kind=dht"])
            assert m2["dhtnode_drops_total,reason=malformed"] >= 1
            assert m2["dhtnode_rpc_latency_seconds_count,command=lookup"] >= 1

            # SIGHUP: log level, bootstrap list and record limits; the port needs a restart.
            write_config(cfg, bootstrap=[f"127.0.0.1:{boot_port}", f"127.0.0.1:{peer_port}"],
                         level="debug", max_total=7, metrics=mport, port=1)
            p.send_signal(signal.SIGHUP)
            done = wait_event(log, "reloaded")
            assert done["applied"] == ["log.level", "node.bootstrap", "records.max_total"]
            assert done["log_level"] == "debug"
            assert wait_event(log, "reload_needs_restart")["settings"] == ["node.port"]
            assert p.poll() is None
            # A bad config on SIGHUP keeps the running one.
            cfg.write_text("[node]\nport = -1\n")
            p.send_signal(signal.SIGHUP)
            assert "node.port" in wait_event(log, "reload_failed")["error"]
            st = asyncio.run(control.request(sock, "status"))
            assert st["routing_table_size"] >= 1

            code, elapsed = sigterm_timed(p)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        print(f"SIGTERM to exit, with one announcement to withdraw: {elapsed:.2f} s")
        assert code == 0
        assert elapsed < 4.0
        names = [e.get("event") for e in log_events(log)]
        assert "announcements_withdrawn" in names and "shutdown_done" in names
        cache = json.loads((state / "nodes.json").read_text())
        assert f"127.0.0.1:{boot_port}" in cache["nodes"]


def _bind_port(log: Path) -> int:
    return int(wait_event(log, "node_started")["bind"].rsplit(":", 1)[1])


def _args(**kw: Any) -> argparse.Namespace:
    base: dict[str, Any] = dict(control=None, state_dir=None, config=None, log_level=None,
                                log_format=None, verb="status")
    base.update(kw)
    return argparse.Namespace(**base)


def test_control_path_choice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    own_state = tmp_path / "own"
    monkeypatch.setenv("DHTNODE_STATE_DIR", str(own_state))
    system = tmp_path / "system.sock"
    monkeypatch.setattr(common, "SYSTEM_CONTROL_SOCKET", system)
    assert common.control_path(_args(control=Path("/x/y.sock"))) == Path("/x/y.sock")
    # No system daemon: the user's own path (its error message says how to start one).
    assert common.control_path(_args()) == own_state / "control.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(system))
    s.listen()
    try:
        # No daemon of the user's own answers: the system service's.
        assert common.control_path(_args()) == system
        # --state-dir names a daemon: no fallback.
        assert common.control_path(_args(state_dir=own_state)) == own_state / "control.sock"
    finally:
        s.close()


def test_permission_error_names_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def denied(*a: Any, **k: Any) -> Any:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(asyncio, "open_unix_connection", denied)
    with pytest.raises(control.ControlError, match="add yourself to group dhtnode"):
        asyncio.run(control.request(tmp_path / "c.sock", "status"))


def test_sigterm_with_every_peer_gone(tmp_path: Path) -> None:
    """The worst case: the storers of our record are gone, the withdrawal is never
    acknowledged; the daemon still exits within SHUTDOWN_GRACE (3 s) and a bit."""
    state = tmp_path / "node"
    state.mkdir(mode=0o700)
    log = state / "log"
    with running_daemon(tmp_path / "boot", "--host", "127.0.0.1", "--bootstrap-node",
                        "--public-host", "127.0.0.1") as boot_port:
        with log.open("wb") as f:
            p = subprocess.Popen(
                [sys.executable, "-m", "dhtnode", "run", "--state-dir", str(state), "--host",
                 "127.0.0.1", "--port", "0", "--bootstrap", f"127.0.0.1:{boot_port}",
                 "--log-format", "json"], stderr=f, stdout=subprocess.DEVNULL)
        try:
            wait_event(log, "bootstrap_done")
            res = asyncio.run(control.request(state / "control.sock", "announce",
                                              topic="cd" * 32))
            assert res["stored_on"] >= 1
        except BaseException:
            p.kill()
            p.wait()
            raise
    code, elapsed = sigterm_timed(p)
    print(f"SIGTERM to exit, nobody left to acknowledge the withdrawal: {elapsed:.2f} s")
    assert code == 0
    assert elapsed < 5.0
    assert (state / "nodes.json").exists()
