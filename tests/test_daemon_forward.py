"""[[expose]] and [[forward]] in the daemon's config: two daemons on loopback carry a TCP
service by key, and bad entries are refused with the field named."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dhtnode.daemon.config import load_config
from dhtnode.errors import ConfigError
from tests.daemon import running_daemon

pytestmark = pytest.mark.slow


def _tcp_service() -> tuple[socket.socket, int]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)

    def serve() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            with c:
                data = b""
                while chunk := c.recv(65536):
                    data += chunk
                    if data.endswith(b"\n"):
                        break
                c.sendall(b"echo:" + data)

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


def _keygen(path: Path) -> str:
    out = subprocess.run([sys.executable, "-m", "dhtnode", "keygen", "--out", str(path),
                          "--json"], capture_output=True, text=True, check=True)
    return str(json.loads(out.stdout)["public_key"])


def test_expose_and_forward_from_config(tmp_path: Path) -> None:
    srv, port = _tcp_service()
    svc_key = _keygen(tmp_path / "svc.key")
    client_key = _keygen(tmp_path / "client.key")
    fwd_port = socket.socket()
    fwd_port.bind(("127.0.0.1", 0))
    local = fwd_port.getsockname()[1]
    fwd_port.close()
    try:
        with running_daemon(tmp_path / "b1", "--host", "127.0.0.1", "--bootstrap-node") as p1:
            boot = f"127.0.0.1:{p1}"
            (tmp_path / "a.toml").write_text(
                f'[[expose]]\ntarget = "127.0.0.1:{port}"\nallow = ["{client_key}"]\n'
                f'key_file = "{tmp_path / "svc.key"}"\n')
            # The forwarding daemon's identity is the allowed client key.
            (tmp_path / "b").mkdir(mode=0o700)
            (tmp_path / "client.key").rename(tmp_path / "b" / "identity.key")
            (tmp_path / "b.toml").write_text(
                f'[[forward]]\npublic_key = "{svc_key}"\nlisten = "127.0.0.1:{local}"\n')
            with running_daemon(tmp_path / "b2", "--host", "127.0.0.1", "--bootstrap-node",
                                "--bootstrap", boot), \
                 running_daemon(tmp_path / "a", "--host", "127.0.0.1", "--bootstrap", boot,
                                "--config", str(tmp_path / "a.toml")), \
                 running_daemon(tmp_path / "b", "--host", "127.0.0.1", "--bootstrap", boot,
                                "--config", str(tmp_path / "b.toml")):
                got = b""
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and not got:
                    try:
                        with socket.create_connection(("127.0.0.1", local), timeout=5) as c:
                            c.sendall(b"hello\n")
                            c.shutdown(socket.SHUT_WR)
                            got = c.recv(100)
                    except OSError:
                        time.sleep(0.5)
                assert got == b"echo:hello\n"
    finally:
        srv.close()


def test_bad_entries_name_the_field(tmp_path: Path) -> None:
    cases = {
        '[[expose]]\ntarget = "127.0.0.1:22"\n': "expose[0].allow",
        '[[expose]]\ntarget = "127.0.0.1:22"\nallow = ["zz"]\n': "expose[0].allow",
        '[[forward]]\nlisten = "127.0.0.1:1"\n': "forward[0].public_key",
        '[[forward]]\npublic_key = "' + "ab" * 32 + '"\nlisten = "x"\n': "forward[0].listen",
        '[expose]\ntarget = "127.0.0.1:22"\n': "expose",
    }
    for text, field in cases.items():
        p = tmp_path / "c.toml"
        p.write_text(text)
        with pytest.raises(ConfigError) as err:
            load_config(p)
        assert err.value.field == field, (text, str(err.value))
    p.write_text('[[expose]]\ntarget = "127.0.0.1:22"\npublic = true\n')
    assert load_config(p).expose[0].public
