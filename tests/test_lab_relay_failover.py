"""A relayed-only connection moves to another relay when its relay's process is killed: the NAT
lab, real processes.

Three public DHT nodes (``dhtnode run --bootstrap-node``, each offering a blind relay);
``python3 -m http.server`` behind a symmetric NAT, exposed with ``dhtnode expose``; ``dhtnode
forward`` behind another symmetric NAT. Random ports on both sides: no punch works, the
connection stays on the introducer's relay (1 MB/s per session by default, so a 4 MB download
takes seconds). Mid-download the public node relaying it is killed (SIGKILL); the forward side
notices the relay's silence, introduces itself again through another public node, and the same
QUIC connection moves onto that node's relay: the download completes intact (sha256) without a
second connection (one ``connected`` event, one ``relay_moved``).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from dhtnode.daemon import control
from tests.netlab import LabHost, running_lab
from tests.test_connect_matrix import ROOT, World
from tests.test_lab_forward_swarm import Env, _download, _events, _sha, _wait_log

pytestmark = [pytest.mark.netns, pytest.mark.slow]

#: Size of the file downloaded over the relayed connection.
FILE_SIZE = 4 * 1024 * 1024
HTTP_PORT = 8000
FORWARD_PORT = 18100
#: Seconds into the download when the relay is killed.
KILL_AFTER = 1.5
#: Seconds the download may take in all (about 4 s at the relay's rate, plus the failover).
DOWNLOAD_TIMEOUT = 45.0


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    with running_lab() as lab:
        world = World(lab, tmp_path_factory.mktemp("lab-relay-failover"))
        e = Env(world)
        try:
            world.start_public(3)
            yield e
        finally:
            e.close()
            world.close()


def _relay_status(world: World, h: LabHost) -> dict[str, Any]:
    try:
        st = asyncio.run(control.request(world.tmp / h.name / "control.sock", "status",
                                         timeout=5))
    except (control.ControlError, OSError):
        return {}
    relay = st.get("relay", {})
    return dict(relay) if isinstance(relay, dict) else {}


def test_relay_killed_mid_download_moves_to_another_relay(env: Env) -> None:
    world = env.world
    srv = env.lab.host("rf-srv", kind="symmetric")
    cli = env.lab.host("rf-cli", kind="symmetric")
    www = env.tmp / "www"
    www.mkdir()
    payload = os.urandom(FILE_SIZE)
    (www / "file.bin").write_bytes(payload)
    env.start(srv, "http", ["python3", "-m", "http.server", "--bind", "127.0.0.1",
                            str(HTTP_PORT), "--directory", str(www)])
    exposer = env.dhtnode(srv, "expose", "expose", f"127.0.0.1:{HTTP_PORT}", "--public",
                          "--json")
    first = exposer.read_json(20)
    assert first.get("ok") and first.get("listening"), first
    key = str(first["public_key"])
    fwd = env.dhtnode(cli, "forward", "forward", key, "--listen",
                      f"127.0.0.1:{FORWARD_PORT}", "--json")
    assert fwd.read_json(20).get("forwarding")

    out = env.tmp / "got.bin"
    t0 = time.monotonic()
    curl = subprocess.Popen(_download(cli, FORWARD_PORT, out, DOWNLOAD_TIMEOUT),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        # The relay carrying it: the public node with a paired session.
        relay: LabHost | None = None
        deadline = time.monotonic() + 20
        while relay is None and time.monotonic() < deadline:
            relay = next((h for h in world.public
                          if _relay_status(world, h).get("paired", 0) > 0), None)
            if relay is None:
                time.sleep(0.2)
        assert relay is not None, f"no relayed session:\n{fwd.tail()}"
        time.sleep(max(0.0, t0 + KILL_AFTER - time.monotonic()))
        assert curl.poll() is None, "the download ended before the relay was killed"
        idx = world.public.index(relay)
        world.procs[idx].p.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        moved: float | None = None
        while curl.poll() is None and time.monotonic() - t0 < DOWNLOAD_TIMEOUT + 5:
            if moved is None and _events(fwd, "relay_moved"):
                moved = time.monotonic() - killed
            time.sleep(0.1)
        _, err = curl.communicate(timeout=5)
        took = time.monotonic() - t0
    finally:
        if curl.poll() is None:
            curl.kill()
            curl.wait()
    assert curl.returncode == 0, err.decode(errors="replace")
    assert _sha(out) == hashlib.sha256(payload).hexdigest()
    _wait_log(fwd, "relay_moved", 1, 10)
    _wait_log(exposer, "relay_moved", 1, 10)
    # The same connection: one connect, one accept, no close in between.
    assert _events(fwd, "connected") == 1, fwd.tail()
    assert _events(exposer, "accepted") == 1, exposer.tail()
    assert moved is not None
    print(f"\nrelay {relay.name} killed {killed - t0:.1f} s into the download; moved to "
          f"another relay {moved:.1f} s later; 4 MB download done in {took:.1f} s")
    # The other relays took over: one of them carries a paired session now.
    others = [h for h in world.public if h is not relay]
    assert any(_relay_status(world, h).get("paired", 0) > 0 for h in others)
