"""Port forwarding and topic swarms with real processes in the NAT lab.

One lab for all tests (about 75 s on two busy cores): three public DHT nodes (``dhtnode run
--bootstrap-node`` on open hosts), then

* **forwarding**: ``python3 -m http.server`` on 127.0.0.1 of a host behind a port-restricted
  NAT, exposed with ``dhtnode expose --allow CLIENTKEY``; ``dhtnode forward`` on a host behind
  a symmetric NAT. A 10 MB random file downloaded with ``curl`` through the forwarded port
  arrives intact, so do 20 downloads at once; the expose process is stopped (SIGTERM) and
  started again with the same key, and the next download works without restarting
  ``forward``; then it is killed (SIGKILL): forward notices within seconds (``peer_silent``)
  and the next download after a restart connects afresh. A client key that is not allowed
  gets nothing: its TCP connection closes without data. A service that speaks first (a
  banner before the client's first byte) reaches a client that sends nothing.
* **swarm**: ten peers behind mixed NATs run ``dhtnode join --topic-name lab-swarm --echo``;
  every pair ends with exactly one connection: each process reports exactly the nine others
  (``peer`` events), 90 events in all. Then the peer with the smallest key (it dials everyone)
  is killed (SIGKILL: nobody hears it go) and started again with its key file: it connects to
  all nine again, and each of them reports it once more. Then the same for the peer with the
  largest key (it dials nobody): the others notice the dead connection within seconds and
  dial the new process (about 9 s; 43 s before swarm connections had a liveness watch).

Figures (download times, time until the swarm is complete) are printed (``pytest -s``).
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.netlab import LabHost, running_lab
from tests.procs import stop
from tests.test_connect_matrix import ROOT, World, dhtnode

pytestmark = [pytest.mark.netns, pytest.mark.slow]

#: Size of the file served over the forwarded port.
FILE_SIZE = 10 * 1024 * 1024
#: Downloads at once.
PARALLEL = 20
HTTP_PORT = 8000
FORWARD_PORT = 18000
#: Seconds a download may take (the 20 at once: twice as long; 15-20 s on 2 busy cores).
DOWNLOAD_TIMEOUT = 30.0
#: Kinds of the ten swarm peers.
SWARM_KINDS = ("open", "open", "port-restricted", "port-restricted", "restricted",
               "restricted", "cgnat", "full-cone", "symmetric", "sequential")
#: Seconds until every pair of the swarm must be connected.
SWARM_TIMEOUT = 60.0
#: Seconds until a restarted peer is connected to everyone again.
SWARM_RESTART_TIMEOUT = 20.0
#: Seconds to keep listening after the swarm is complete (a second connection would show).
SWARM_SETTLE = 3.0
LOG_ARGS = ("--log-format", "json", "--log-level", "info")


class Proc:
    """A long-running process in a namespace: stdout read line by line, stderr to a file."""

    def __init__(self, ns: str, log: Path, argv: list[str]) -> None:
        self.log_path = log
        self.log = log.open("wb")
        self.p = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=subprocess.PIPE,
                                  stderr=self.log, cwd=ROOT)
        self._buf = b""

    def fileno(self) -> int:
        assert self.p.stdout is not None
        return self.p.stdout.fileno()

    def pump(self) -> list[dict[str, Any]]:
        """Read what is there (call when select says readable); the complete JSON lines."""
        chunk = os.read(self.fileno(), 65536)
        self._buf += chunk
        out = []
        while b"\n" in self._buf:
            line, _, self._buf = self._buf.partition(b"\n")
            if line.strip():
                out.append(dict(json.loads(line)))
        return out

    def read_json(self, timeout: float) -> dict[str, Any]:
        """The next JSON line on stdout."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or self.p.poll() is not None:
                raise AssertionError(f"no output from {self.p.args}; log:\n{self.tail()}")
            r, _, _ = select.select([self], [], [], min(left, 0.5))
            if r:
                self._buf += os.read(self.fileno(), 65536)
        line, _, self._buf = self._buf.partition(b"\n")
        return dict(json.loads(line))

    def tail(self, n: int = 30) -> str:
        self.log.flush()
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def stop(self, sig: int = signal.SIGTERM) -> None:
        stop(self.p, sig=sig, timeout=5)
        if self.p.stdout is not None:
            self.p.stdout.close()
        self.log.close()


class Env:
    """The lab with its public DHT nodes, and every process the tests start."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.lab = world.lab
        self.tmp = world.tmp
        self.procs: list[Proc] = []

    def start(self, host: LabHost, tag: str, argv: list[str]) -> Proc:
        p = Proc(host.ns, self.tmp / f"{tag}.log", argv)
        self.procs.append(p)
        return p

    def dhtnode(self, host: LabHost, tag: str, *args: str) -> Proc:
        return self.start(host, tag, [sys.executable, "-m", "dhtnode", *args, "--bootstrap",
                                      self.world.bootstrap, *LOG_ARGS])

    def close(self) -> None:
        # Every process at once: each takes a moment to leave (withdraw its record).
        for p in self.procs:
            if p.p.poll() is None:
                p.p.terminate()
        for p in reversed(self.procs):
            p.stop()
        self.procs.clear()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    with running_lab() as lab:
        world = World(lab, tmp_path_factory.mktemp("lab-forward-swarm"))
        e = Env(world)
        try:
            t0 = time.monotonic()
            world.start_public(3)
            print(f"\nlab: 3 public DHT nodes up in {time.monotonic() - t0:.1f}s")
            yield e
        finally:
            e.close()
            world.close()


# --- forwarding ----------------------------------------------------------------------------


def _download(host: LabHost, port: int, out: Path, timeout: float) -> list[str]:
    url = f"http://127.0.0.1:{port}/file.bin"
    if shutil.which("curl"):
        return ["ip", "netns", "exec", host.ns, "curl", "-sS", "--fail", "--max-time",
                str(int(timeout)), "-o", str(out), url]
    code = ("import sys, urllib.request; "
            f"open(sys.argv[1], 'wb').write(urllib.request.urlopen({url!r}, "
            f"timeout={timeout}).read())")
    return ["ip", "netns", "exec", host.ns, "python3", "-c", code, str(out)]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "missing"


def _downloads(host: LabHost, port: int, outs: list[Path]) -> tuple[float, list[str]]:
    """Download to every path in ``outs`` at once; (seconds, sha256 of each, or an error)."""
    for o in outs:
        o.unlink(missing_ok=True)
    timeout = DOWNLOAD_TIMEOUT * (2 if len(outs) > 1 else 1)
    t0 = time.monotonic()
    ps = [subprocess.Popen(_download(host, port, o, timeout), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE) for o in outs]
    errs = []
    try:
        for p in ps:
            try:
                left = timeout + 5 - (time.monotonic() - t0)
                _, err = p.communicate(timeout=max(1.0, left))
                errs.append(err.decode(errors="replace").strip() if p.returncode else "")
            except subprocess.TimeoutExpired:
                errs.append("timeout")
    finally:
        for p in ps:
            if p.poll() is None:
                p.kill()
                p.wait()
    took = time.monotonic() - t0
    return took, [e or _sha(o) for o, e in zip(outs, errs, strict=True)]


def _events(p: Proc, name: str) -> int:
    """How many ``name`` events ``p`` has logged (JSON log lines on stderr)."""
    p.log.flush()
    n = 0
    for line in p.log_path.read_text(errors="replace").splitlines():
        try:
            n += json.loads(line).get("event") == name
        except ValueError:
            continue
    return n


def _wait_log(p: Proc, name: str, n: int, timeout: float) -> int:
    """Wait until ``p`` has logged at least ``n`` ``name`` events; how many it has."""
    deadline = time.monotonic() + timeout
    while (got := _events(p, name)) < n and time.monotonic() < deadline:
        time.sleep(0.1)
    assert got >= n, f"{got} {name} events in {p.log_path}, expected {n}:\n{p.tail()}"
    return got


def test_forward_through_nats(env: Env) -> None:
    srv = env.lab.host("fwd-srv", kind="port-restricted")
    cli = env.lab.host("fwd-cli", kind="symmetric")
    tmp = env.tmp
    www = tmp / "www"
    www.mkdir()
    payload = os.urandom(FILE_SIZE)
    (www / "file.bin").write_bytes(payload)
    want = hashlib.sha256(payload).hexdigest()
    figures: list[str] = []

    env.start(srv, "http", ["python3", "-m", "http.server", "--bind", "127.0.0.1",
                            str(HTTP_PORT), "--directory", str(www)])
    cli_key = tmp / "client.key"
    out = subprocess.run(dhtnode(cli.ns, "keygen", "--out", str(cli_key), "--json"),
                         capture_output=True, text=True, timeout=20, cwd=ROOT, check=True)
    client = json.loads(out.stdout)["public_key"]
    srv_key = tmp / "expose.key"

    def expose(n: int) -> tuple[Proc, str]:
        p = env.dhtnode(srv, f"expose-{n}", "expose", f"127.0.0.1:{HTTP_PORT}", "--allow",
                        client, "--key-file", str(srv_key), "--json")
        first = p.read_json(20)
        assert first.get("ok") and first.get("listening"), first
        return p, str(first["public_key"])

    t0 = time.monotonic()
    exposer, key = expose(1)
    fwd = env.dhtnode(cli, "forward", "forward", key, "--listen",
                      f"127.0.0.1:{FORWARD_PORT}", "--key-file", str(cli_key), "--json")
    first = fwd.read_json(20)
    assert first == {"ok": True, "listen": f"127.0.0.1:{FORWARD_PORT}", "forwarding": True,
                     "public_key": key}, first
    # A client whose key is not allowed: a fresh key, its own forwarded port.
    stranger = env.dhtnode(cli, "forward-stranger", "forward", key, "--listen",
                           f"127.0.0.1:{FORWARD_PORT + 1}", "--json")
    assert stranger.read_json(20).get("forwarding")
    figures.append(f"expose + forward up in {time.monotonic() - t0:.1f}s")

    took, shas = _downloads(cli, FORWARD_PORT, [tmp / "dl-first.bin"])
    figures.append(f"first download (connect included): {took:.2f}s")
    assert shas == [want], f"{shas}\nforward log:\n{fwd.tail()}\nexpose log:\n{exposer.tail()}"

    # Birthday (symmetric client, consistent server): relay-first, then the direct path
    # (the 20 downloads below would take minutes at the relay's 1 MB/s per session).
    _wait_log(fwd, "path_upgraded", 1, 15)
    figures.append(f"on the direct path {time.monotonic() - t0:.1f}s after the start")

    took, shas = _downloads(cli, FORWARD_PORT, [tmp / "dl-second.bin"])
    figures.append(f"second download: {took:.2f}s ({FILE_SIZE / took / 1e6:.1f} MB/s)")
    assert shas == [want], shas

    outs = [tmp / f"dl-par-{i:02d}.bin" for i in range(PARALLEL)]
    took, shas = _downloads(cli, FORWARD_PORT, outs)
    figures.append(f"{PARALLEL} downloads at once: {took:.2f}s "
                   f"({PARALLEL * FILE_SIZE / took / 1e6:.1f} MB/s in all)")
    bad = [(i, s) for i, s in enumerate(shas) if s != want]
    assert not bad, f"{len(bad)} of {PARALLEL} downloads broken: {bad}\n{fwd.tail()}"
    for o in outs:
        o.unlink()

    # The stranger's TCP connection closes without a byte.
    t1 = time.monotonic()
    got = subprocess.run(
        ["ip", "netns", "exec", cli.ns, "python3", "-c",
         "import socket, sys; s = socket.create_connection(('127.0.0.1', int(sys.argv[1]))); "
         "s.settimeout(30); s.sendall(b'GET /file.bin HTTP/1.0\\r\\n\\r\\n'); "
         "d = s.recv(65536); print(len(d))", str(FORWARD_PORT + 1)],
        capture_output=True, text=True, timeout=40)
    figures.append(f"not-allowed client closed after {time.monotonic() - t1:.2f}s")
    assert got.returncode == 0 and got.stdout.strip() == "0", (got.stdout, got.stderr)
    _wait_log(stranger, "forward_failed", 1, 5)
    assert "refused our key" in stranger.tail(), stranger.tail()

    # The exposing side restarts with the same key; forward keeps running.
    exposer.stop(signal.SIGTERM)
    assert exposer.p.returncode == 0, exposer.tail()
    t1 = time.monotonic()
    exposer, key2 = expose(2)
    assert key2 == key
    took, shas = _downloads(cli, FORWARD_PORT, [tmp / "dl-after-restart.bin"])
    figures.append(f"download after the expose restart: {took:.2f}s "
                   f"({time.monotonic() - t1:.1f}s from the restart)")
    assert shas == [want], f"{shas}\nforward log:\n{fwd.tail()}\nexpose log:\n{exposer.tail()}"
    assert fwd.p.poll() is None
    # One connection before the restart (the 22 downloads shared it), one after.
    assert _wait_log(fwd, "forward_connected", 2, 1) == 2, fwd.tail()

    # The exposing side dies without a word (SIGKILL): forward notices within seconds (its
    # liveness watch; QUIC's idle timeout alone took 30 s), and the next download after a
    # restart connects afresh.
    exposer.stop(signal.SIGKILL)
    t1 = time.monotonic()
    _wait_log(fwd, "peer_silent", 1, 15)
    figures.append(f"SIGKILLed exposer noticed after {time.monotonic() - t1:.1f}s")
    exposer, key3 = expose(3)
    assert key3 == key
    took, shas = _downloads(cli, FORWARD_PORT, [tmp / "dl-after-kill.bin"])
    figures.append(f"download after the SIGKILL and a restart: {took:.2f}s "
                   f"({time.monotonic() - t1:.1f}s from the kill)")
    assert shas == [want], f"{shas}\nforward log:\n{fwd.tail()}\nexpose log:\n{exposer.tail()}"
    assert _wait_log(fwd, "forward_connected", 3, 1) == 3, fwd.tail()
    print("\nforwarding (port-restricted <- symmetric):\n  " + "\n  ".join(figures))


def test_forward_server_speaks_first(env: Env) -> None:
    """A service that speaks first (SMTP, MySQL, VNC...): its banner reaches a client that
    sends nothing (the exposer must connect to it before the client's first byte)."""
    srv = env.lab.host("ban-srv", kind="restricted")
    cli = env.lab.host("ban-cli", kind="sequential")
    port = HTTP_PORT + 1
    env.start(srv, "banner", [
        sys.executable, "-c",
        "import socket, sys\n"
        "s = socket.create_server(('127.0.0.1', int(sys.argv[1])))\n"
        "while True:\n"
        "    c, _ = s.accept(); c.sendall(b'220 lab banner\\r\\n'); c.close()\n",
        str(port)])
    exposer = env.dhtnode(srv, "expose-banner", "expose", f"127.0.0.1:{port}", "--public",
                          "--key-file", str(env.tmp / "banner.key"), "--json")
    key = str(exposer.read_json(20)["public_key"])
    fwd = env.dhtnode(cli, "forward-banner", "forward", key, "--listen",
                      f"127.0.0.1:{FORWARD_PORT + 2}", "--json")
    assert fwd.read_json(20).get("forwarding")
    t0 = time.monotonic()
    got = subprocess.run(
        ["ip", "netns", "exec", cli.ns, sys.executable, "-c",
         "import socket, sys; s = socket.create_connection(('127.0.0.1', int(sys.argv[1]))); "
         "s.settimeout(15); print(repr(s.recv(100)))", str(FORWARD_PORT + 2)],
        capture_output=True, text=True, timeout=30)
    print(f"\nserver-speaks-first banner through forward: {time.monotonic() - t0:.2f}s")
    assert got.stdout.strip() == repr(b"220 lab banner\r\n"), (
        f"{got.stdout} {got.stderr}\nforward log:\n{fwd.tail()}\nexpose log:\n"
        f"{exposer.tail()}")


# --- swarm ---------------------------------------------------------------------------------


class Swarm:
    """The ``join`` processes, the key each printed, and the peers each reported."""

    def __init__(self, env: Env, hosts: list[LabHost]) -> None:
        self.env = env
        self.hosts = hosts
        self.procs: list[Proc] = [self.join(i) for i in range(len(hosts))]
        self.keys: dict[int, str] = {}
        self.seen: dict[int, list[str]] = {i: [] for i in range(len(hosts))}

    def join(self, i: int) -> Proc:
        h = self.hosts[i]
        return self.env.dhtnode(h, f"join-{h.name}-{len(self.env.procs)}", "join",
                                "--topic-name", "lab-swarm", "--key-file",
                                str(self.env.tmp / f"{h.name}.key"), "--json", "--echo")

    def restart(self, i: int) -> None:
        """Kill peer ``i`` without a word to anyone (SIGKILL) and start it again, same key."""
        self.procs[i].stop(signal.SIGKILL)
        self.procs[i] = self.join(i)
        self.seen[i] = []

    def collect(self, done: Any, timeout: float, settle: float) -> float | None:
        """Read events until ``done()`` has held for ``settle`` seconds; the time it took to
        hold, or None after ``timeout``."""
        t0 = time.monotonic()
        held: float | None = None
        while time.monotonic() < t0 + timeout:
            if held is not None and time.monotonic() > held + settle:
                break
            dead = [(self.hosts[i].kind, p.p.returncode, p.tail(5))
                    for i, p in enumerate(self.procs) if p.p.poll() is not None]
            assert not dead, dead
            r, _, _ = select.select(self.procs, [], [], 0.2)
            for p in r:
                i = self.procs.index(p)
                for obj in p.pump():
                    assert obj.get("ok"), obj
                    if obj.get("joined"):
                        self.keys[i] = str(obj["public_key"])
                    elif obj.get("event") == "peer":
                        self.seen[i].append(str(obj["public_key"]))
            if held is None and done():
                held = time.monotonic()
        return None if held is None else held - t0

    def complete(self) -> bool:
        n = len(self.procs)
        return len(self.keys) == n and all(len(set(s)) == n - 1 for s in self.seen.values())

    def summary(self) -> str:
        return (f"{len(self.keys)}/{len(self.procs)} joined; peer events: "
                + ", ".join(f"{h.kind} {len(self.seen[i])}" for i, h in enumerate(self.hosts)))

    def problems(self) -> list[str]:
        out = []
        for i, h in enumerate(self.hosts):
            others = set(self.keys.values()) - {self.keys[i]}
            if sorted(self.seen[i]) != sorted(others):
                lacking = [self.hosts[j].kind for j, k in self.keys.items()
                           if k in others - set(self.seen[i])]
                out.append(f"{h.name} ({h.kind}, {self.keys[i][:8]}): {len(self.seen[i])} "
                           f"events, missing {lacking}, log {self.procs[i].log_path}")
        return out


def test_swarm_every_pair_once(env: Env) -> None:
    hosts = [env.lab.host(f"sw{i}", kind=k) for i, k in enumerate(SWARM_KINDS)]
    n = len(hosts)
    swarm = Swarm(env, hosts)
    took = swarm.collect(swarm.complete, SWARM_TIMEOUT, SWARM_SETTLE)
    print(f"\nswarm of {n} ({', '.join(SWARM_KINDS)}): {swarm.summary()}; "
          + (f"complete after {took:.1f}s" if took is not None
             else f"NOT complete after {SWARM_TIMEOUT:.0f}s"))
    assert len(swarm.keys) == n, swarm.summary()
    assert not swarm.problems(), "\n".join(swarm.problems())
    # Exactly one connection per pair, seen from both ends.
    assert sum(len(s) for s in swarm.seen.values()) == n * (n - 1)

    # The peer with the smallest key (it dials everyone) dies without a word and comes back
    # with the same key: everyone takes its new connection (their old one is stale).
    i = min(swarm.keys, key=lambda j: swarm.keys[j])
    key = swarm.keys[i]
    before = {j: len(s) for j, s in swarm.seen.items()}
    swarm.restart(i)

    def back() -> bool:
        return (swarm.keys.get(i) == key and len(set(swarm.seen[i])) == n - 1
                and all(swarm.seen[j][before[j]:] == [key] for j in swarm.seen if j != i))

    took = swarm.collect(back, SWARM_RESTART_TIMEOUT, SWARM_SETTLE)
    print(f"{hosts[i].kind} peer (smallest key) killed and restarted: "
          + (f"everyone reconnected after {took:.1f}s" if took is not None
             else f"NOT back after {SWARM_RESTART_TIMEOUT:.0f}s: {swarm.summary()}"))
    assert took is not None, [(hosts[j].kind, swarm.seen[j][before[j]:] if j != i
                               else len(swarm.seen[i])) for j in swarm.seen]
    assert back()

    # The peer with the largest key (it dials nobody) dies the same way: the others notice
    # the dead connection in seconds (swarm liveness watch) and dial its new process.
    i = max(swarm.keys, key=lambda j: swarm.keys[j])
    key = swarm.keys[i]
    before = {j: len(s) for j, s in swarm.seen.items()}
    swarm.restart(i)
    took = swarm.collect(back, SWARM_RESTART_TIMEOUT, SWARM_SETTLE)
    print(f"{hosts[i].kind} peer (largest key) killed and restarted: "
          + (f"everyone reconnected after {took:.1f}s" if took is not None
             else f"NOT back after {SWARM_RESTART_TIMEOUT:.0f}s: {swarm.summary()}"))
    assert took is not None, [(hosts[j].kind, swarm.seen[j][before[j]:] if j != i
                               else len(swarm.seen[i])) for j in swarm.seen]
    assert back()
