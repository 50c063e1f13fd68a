"""Separate processes on loopback: a bootstrap node and 10 `dhtnode run` daemons, then
`dhtnode announce` and `dhtnode lookup --json` from two more processes find each other.
Also: `dhtnode status`, clean shutdown on SIGTERM (withdraws, saves the node cache), and a
restart that keeps the identity and rejoins from the cache alone.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dhtnode.daemon import control
from tests.procs import stop

pytestmark = pytest.mark.slow

DAEMONS = 10
TOPIC_NAME = "process-test-topic"


def dhtnode(*args: str) -> list[str]:
    return [sys.executable, "-m", "dhtnode", *args]


class Proc:
    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        self._f = log.open("wb")
        self.p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self._f)

    def bind_port(self, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log.read_text().splitlines():
                if '"node_started"' in line:
                    return int(json.loads(line)["bind"].rsplit(":", 1)[1])
            if self.p.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"daemon did not start: {self.log.read_text()}")

    def stop(self) -> int:
        stop(self.p)
        self._f.close()
        if self.p.stdout:
            self.p.stdout.close()
        return self.p.returncode


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        p.stop()


def status(state: Path) -> dict[str, Any]:
    return asyncio.run(control.request(state / "control.sock", "status", timeout=5))  # type: ignore[no-any-return]


def wait_until(cond: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.2)
    return False


def test_daemons_announce_and_lookup_across_processes(tmp_path: Path, procs: list[Proc]) -> None:
    env_args = ["--host", "127.0.0.1", "--log-format", "json"]
    boot_dir = tmp_path / "boot"
    boot = Proc(dhtnode("run", "--state-dir", str(boot_dir), "--port", "0",
                        "--bootstrap-node", *env_args), tmp_path / "boot.log")
    procs.append(boot)
    boot_addr = f"127.0.0.1:{boot.bind_port()}"
    dirs = [tmp_path / f"d{i}" for i in range(DAEMONS)]
    daemons = [
        Proc(dhtnode("run", "--state-dir", str(d), "--port", "0", "--bootstrap", boot_addr,
                     *env_args), tmp_path / f"d{i}.log")
        for i, d in enumerate(dirs)
    ]
    procs.extend(daemons)
    for d in daemons:
        d.bind_port()

    # Every daemon learns its address, proves it is reachable and serves.
    ok = wait_until(lambda: all(status(d)["server"] for d in dirs), 30)
    for d in dirs:
        if not status(d)["server"]:
            print("NOT SERVING", json.dumps(status(d)))
    assert ok
    st = status(dirs[0])
    assert st["public_address"] == f"127.0.0.1:{daemons[0].bind_port()}"
    assert st["routing_table_size"] >= 1 and st["node_id"]

    # `dhtnode status` (text and JSON) against a running daemon.
    out = subprocess.run(dhtnode("status", "--state-dir", str(dirs[1]), "--json"),
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    js = json.loads(out.stdout)
    for key in ("node_id", "public_address", "nat_class", "reachable", "routing_table_size",
                "records_stored"):
        assert key in js
    assert oct(os.stat(dirs[1] / "control.sock").st_mode & 0o777) == "0o600"
    assert oct(os.stat(dirs[1] / "identity.key").st_mode & 0o777) == "0o600"

    # A short-lived announcer in its own process, kept alive...
    ann_dir = tmp_path / "announcer"
    announcer = subprocess.Popen(
        dhtnode("announce", "--topic-name", TOPIC_NAME, "--bootstrap", boot_addr,
                "--keep-alive", "60", "--state-dir", str(ann_dir), "--json"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert announcer.stdout is not None
        line = announcer.stdout.readline()
        assert line, announcer.stderr.read() if announcer.stderr else ""
        announced = json.loads(line)
        assert announced["event"] == "announced" and announced["stored_on"] >= 5

        # ...is found by a lookup from another process.
        out = subprocess.run(
            dhtnode("lookup", "--topic-name", TOPIC_NAME, "--bootstrap", boot_addr, "--json",
                    "--state-dir", str(tmp_path / "looker")),
            capture_output=True, text=True, timeout=30,
        )
        assert out.returncode == 0, out.stderr
        records = [json.loads(x) for x in out.stdout.splitlines()]
        keys = {r["public_key"] for r in records}
        assert announced["public_key"] in keys
        rec = next(r for r in records if r["public_key"] == announced["public_key"])
        assert {"topic", "public_key", "seq", "addresses"} <= rec.keys()
        assert any(a["kind"] == "direct" for a in rec["addresses"])

        # SIGTERM: the announcer withdraws its record before exiting.
        announcer.send_signal(signal.SIGTERM)
        rest, _ = announcer.communicate(timeout=20)
        assert announcer.returncode == 0
        assert json.loads(rest.splitlines()[-1])["event"] == "unannounced"
    finally:
        if announcer.poll() is None:
            announcer.kill()
            announcer.communicate()
    out = subprocess.run(
        dhtnode("lookup", "--topic-name", TOPIC_NAME, "--bootstrap", boot_addr, "--json",
                "--state-dir", str(tmp_path / "looker")),
        capture_output=True, text=True, timeout=30,
    )
    # Nothing found after the withdrawal: exit 1 and, with --json, the error object.
    assert out.returncode == 1
    assert json.loads(out.stdout)["error"] == "not_found"

    # Clean shutdown saves the node cache; a restart keeps the identity and rejoins from the
    # cache with no bootstrap given.
    key_before = status(dirs[2])["public_key"]
    assert daemons[2].stop() == 0
    cache = json.loads((dirs[2] / "nodes.json").read_text())
    assert cache["nodes"]
    again = Proc(dhtnode("run", "--state-dir", str(dirs[2]), "--port", "0", *env_args),
                 tmp_path / "d2-again.log")
    procs.append(again)
    again.bind_port()
    started = [json.loads(x) for x in again.log.read_text().splitlines() if "node_started" in x]
    assert started[0]["cached_nodes"] >= 1
    assert status(dirs[2])["public_key"] == key_before
    assert wait_until(lambda: status(dirs[2])["routing_table_size"] >= 1, 15)


def test_status_without_daemon_fails_with_a_hint(tmp_path: Path) -> None:
    out = subprocess.run(dhtnode("status", "--state-dir", str(tmp_path)), capture_output=True,
                         text=True, timeout=20)
    assert out.returncode == 1
    assert "dhtnode run" in out.stderr
