"""The key verbs as a user runs them, as separate processes on loopback: `dhtnode listen`
(key file created 0600 and reused), `dhtnode ping PUBKEY --json`, `dhtnode connect` piping
stdin/stdout, and the error contract: JSON errors with `ok: false`, exit 1 for an unknown key
or a refused one, 2 for bad input, 3 when nothing answers."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon import running_daemon
from tests.procs import stop

pytestmark = pytest.mark.slow


def dhtnode(*args: str) -> list[str]:
    return [sys.executable, "-m", "dhtnode", *args]


def run(*args: str, stdin: bytes | None = None, timeout: float = 30) -> tuple[int, str, str]:
    p = subprocess.run(dhtnode(*args), input=stdin, capture_output=True, timeout=timeout)
    return p.returncode, p.stdout.decode(), p.stderr.decode()


@contextlib.contextmanager
def listening(tmp: Path, boot: str, *extra: str) -> Iterator[str]:
    """A `dhtnode listen --json` process; yields the key it serves."""
    err = (tmp / "listen.err").open("wb")
    p = subprocess.Popen(dhtnode("listen", "--json", "--bootstrap", boot, "--state-dir",
                                 str(tmp / "listen-state"), *extra),
                         stdout=subprocess.PIPE, stderr=err)
    try:
        assert p.stdout is not None
        line = p.stdout.readline()
        assert line, (tmp / "listen.err").read_text()
        first = json.loads(line)
        assert first["ok"] is True and first["listening"] is True
        yield str(first["public_key"])
    finally:
        stop(p)
        err.close()


@pytest.fixture
def network(tmp_path: Path) -> Iterator[str]:
    """Three DHT nodes on loopback; yields the bootstrap address."""
    with running_daemon(tmp_path / "b1", "--host", "127.0.0.1", "--bootstrap-node") as p1:
        boot = f"127.0.0.1:{p1}"
        with running_daemon(tmp_path / "b2", "--host", "127.0.0.1", "--bootstrap-node",
                            "--bootstrap", boot), \
             running_daemon(tmp_path / "b3", "--host", "127.0.0.1", "--bootstrap-node",
                            "--bootstrap", boot):
            time.sleep(1.0)
            yield boot


def test_listen_ping_connect(network: str, tmp_path: Path) -> None:
    key_file = tmp_path / "svc.key"
    with listening(tmp_path, network, "--echo", "--key-file", str(key_file)) as key:
        assert (os.stat(key_file).st_mode & 0o777) == 0o600
        rc, out, err = run("ping", key, "--bootstrap", network, "--json")
        assert rc == 0, err
        res = json.loads(out)
        assert res["ok"] is True and res["public_key"] == key
        assert res["path"] == "direct" and res["strategy"] in ("simultaneous", "direct")
        assert res["connect_ms"] > 0 and res["rtt_ms"] > 0
        # The same through the running daemon's control socket.
        rc, out, err = run("ping", key, "--via-daemon", "--state-dir", str(tmp_path / "b1"),
                           "--json")
        assert rc == 0, err
        assert json.loads(out)["ok"] is True and json.loads(out)["path"] == "direct"
        rc, out, err = run("connect", key, "--bootstrap", network, stdin=b"piped bytes\n")
        assert rc == 0, err
        assert out == "piped bytes\n"
    # Restarted with the same key file: the same key.
    with listening(tmp_path, network, "--echo", "--key-file", str(key_file)) as again:
        assert again == key


def test_errors_and_exit_codes(network: str, tmp_path: Path) -> None:
    friend = "11" * 32
    with listening(tmp_path, network, "--echo", "--allow", friend) as key:
        rc, out, _ = run("ping", key, "--bootstrap", network, "--json")
        assert rc == 1 and json.loads(out) == {
            "ok": False, "error": "refused", "message": json.loads(out)["message"]}
    rc, out, _ = run("ping", "ab" * 32, "--bootstrap", network, "--json")
    assert rc == 1 and json.loads(out)["error"] == "peer_not_found"
    rc, out, _ = run("listen", "--allow", "zz", "--bootstrap", network, "--json")
    assert rc == 2 and json.loads(out)["error"] == "usage" and "--allow" in json.loads(out)[
        "message"]
    # Nobody at the bootstrap address: nothing answers.
    rc, out, _ = run("ping", "ab" * 32, "--bootstrap", "127.0.0.1:9", "--json", timeout=60)
    assert rc == 3 and json.loads(out)["error"] == "no_network", out
