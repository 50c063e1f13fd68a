"""Connect by public key across every pair of NAT kinds, with real processes in the NAT lab.

Four public DHT nodes (``dhtnode run --bootstrap-node`` on open hosts); per cell a server host
of kind X running ``dhtnode listen --echo --json`` (one server per kind, reused across client
kinds) and a client host of kind Y running ``dhtnode ping KEY --json`` three times, each a
fresh process, one after another. Every pair connects, and ends on the direct path (a
connect starts on the introducer's blind relay when that is ready before the punch, and moves
when the punch succeeds), except two port-randomizing NATs whose allocation cannot be
predicted (``choose()`` says IMPOSSIBLE), which stay relayed. The strategy each cell reports
is checked against :func:`dhtnode.nat.strategy.choose` on the profiles the two sides can
know: their NAT's class (and sequential port samples), and ``open=False`` for both, because
both are short-lived client-mode nodes (``listen`` and ``ping``) that never prove themselves
reachable.

The matrix (server kind x client kind: strategy, median connect_ms, successes) is printed at
the end (``pytest -s``) and written to ``connect-matrix.txt`` in the test's tmp dir.

By default a representative subset runs (every kind on each side, every consistent/random
combination); ``NATLAB_FULL=1`` runs all 8 x 8 cells. ``NATLAB_CELLS=server:client,...``
runs only the cells named (for debugging one cell).

Also checked: two hosts behind one port-restricted NAT connect over their LAN addresses, and
the lab's firewalled IPv6 pair connects over IPv6, through three IPv6-only public DHT nodes (a
node serves the family of its ``--public-host``; the IPv4 nodes give an IPv6 newcomer nobody).
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from dhtnode.daemon import control
from dhtnode.nat.observer import NatClass
from dhtnode.nat.strategy import NatProfile, Strategy, choose
from tests.netlab import KINDS, SEQ_BASE, Lab, LabHost, running_lab, sh
from tests.procs import stop

pytestmark = [pytest.mark.netns, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
PORT = 49200
#: Public DHT nodes (open hosts, ``--bootstrap-node``).
PUBLIC_NODES = 4
#: Fresh client processes per cell, one after another.
PINGS = 3
#: Seconds a ping process may take at all (the punch deadline is 10 s, QUIC 5 s more).
PING_TIMEOUT = 30.0
#: Seconds a listener may take to print that it listens (bootstrap + announce).
LISTEN_TIMEOUT = 20.0

# (server kind, client kind). Every kind at least once on each side; every combination of a
# consistent and a random NAT, both ways; random on both sides (fails fast) and sequential
# on both sides (predicts); an unproven-open and a firewalled side.
SUBSET: list[tuple[str, str]] = [
    ("open", "symmetric"),
    ("firewalled", "port-restricted"),
    ("full-cone", "firewalled"),
    ("restricted", "symmetric"),
    ("port-restricted", "symmetric"),
    ("symmetric", "port-restricted"),
    ("symmetric", "symmetric"),
    ("port-restricted", "sequential"),
    ("sequential", "port-restricted"),
    ("sequential", "sequential"),
    ("cgnat", "port-restricted"),
    ("restricted", "cgnat"),
    ("port-restricted", "open"),
    ("port-restricted", "full-cone"),
    ("sequential", "restricted"),
    ("symmetric", "sequential"),
]

#: Strategy names in the printed matrix.
SHORT = {"direct": "dir", "simultaneous": "sim", "birthday": "bday", "predict": "pred"}
LEGEND = ("cells: strategy (dir = direct, sim = simultaneous, bday = birthday, pred = predict), "
          "median connect_ms, successes/pings;\n"
          "'relay' = both sides port-randomizing: connected through the introducer's blind "
          "relay; every other cell reports its path after a relay-first start moved to the "
          "direct path; '!' = a cell that broke an expectation")


def cells() -> list[tuple[str, str]]:
    named = os.environ.get("NATLAB_CELLS", "").strip()
    if named:
        out = []
        for c in named.split(","):
            s, _, k = c.strip().partition(":")
            if s not in KINDS or k not in KINDS:
                raise ValueError(f"NATLAB_CELLS: {c!r} is not server:client with kinds {KINDS}")
            out.append((s, k))
        return out
    if os.environ.get("NATLAB_FULL") == "1":
        return [(s, c) for s in KINDS for c in KINDS]
    return list(SUBSET)


def profile(kind: str) -> NatProfile:
    """What a short-lived node of ``kind`` can know about its NAT (see the module doc)."""
    if kind == "sequential":
        return NatProfile(NatClass.RANDOM, False, (SEQ_BASE, SEQ_BASE + 1, SEQ_BASE + 2))
    if kind == "symmetric":
        return NatProfile(NatClass.RANDOM, False, (40123, 2071, 61002))
    return NatProfile(NatClass.CONSISTENT, False, (43000, 43000, 43000))


def expected_strategy(server: str, client: str) -> Strategy:
    return choose(profile(client), profile(server))


# --- processes ----------------------------------------------------------------------------


def dhtnode(ns: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", ns, sys.executable, "-m", "dhtnode", *args]


class Proc:
    """A long-running dhtnode process in a namespace; stderr (JSON log lines) to a file."""

    def __init__(self, ns: str, log: Path, args: list[str]) -> None:
        self.log_path = log
        self.log = log.open("wb")
        self.p = subprocess.Popen(dhtnode(ns, *args), stdout=subprocess.PIPE,
                                  stderr=self.log, cwd=ROOT)
        self._buf = b""

    def read_json(self, timeout: float) -> dict[str, Any]:
        """The next JSON line on stdout."""
        assert self.p.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or self.p.poll() is not None:
                raise AssertionError(f"no output from {self.p.args}; log:\n{self.tail()}")
            r, _, _ = select.select([self.p.stdout], [], [], min(left, 0.5))
            if r:
                chunk = os.read(self.p.stdout.fileno(), 65536)
                if not chunk:
                    continue
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return dict(json.loads(line))

    def tail(self, n: int = 30) -> str:
        self.log.flush()
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def stop(self) -> None:
        stop(self.p, timeout=5)
        if self.p.stdout is not None:
            self.p.stdout.close()
        self.log.close()


@dataclass
class Ping:
    ok: bool
    elapsed: float
    out: dict[str, Any]
    log: Path

    @property
    def strategy(self) -> str:
        return str(self.out.get("strategy", "-"))


@dataclass
class Cell:
    server: str
    client: str
    expected: Strategy
    pings: list[Ping] = field(default_factory=list)

    @property
    def successes(self) -> int:
        return sum(p.ok for p in self.pings)

    def summary(self) -> str:
        """``strategy median-connect-ms successes/pings``; a cell expected to fail shows
        ``relay`` (connected through the relay, as expected)."""
        if not self.pings:
            return "not run"
        got = sorted({SHORT.get(p.strategy, p.strategy) for p in self.pings if p.ok})
        ms = [float(p.out["connect_ms"]) for p in self.pings if p.ok]
        n = f"{self.successes}/{len(self.pings)}"
        if self.expected is Strategy.IMPOSSIBLE and ms:
            flag = "" if not self.problems() else "!"
            return f"{flag}relay {statistics.median(ms):.0f}ms {n}"
        flag = "" if not self.problems() else "!"
        if not ms:
            return f"{flag}FAILED {n}"
        return f"{flag}{'/'.join(got)} {statistics.median(ms):.0f}ms {n}"

    def problems(self) -> list[str]:
        out = []
        name = f"{self.server} <- {self.client}"
        for i, p in enumerate(self.pings):
            if self.expected is Strategy.IMPOSSIBLE:
                # No punch can work: the introducer's blind relay carries the connection.
                if not p.ok:
                    out.append(f"{name} #{i}: {p.out} after {p.elapsed:.1f}s (log {p.log})")
                elif p.out.get("path") != "relayed":
                    out.append(f"{name} #{i}: path {p.out.get('path')}, expected relayed")
                continue
            if not p.ok:
                out.append(f"{name} #{i}: {p.out} after {p.elapsed:.1f}s (log {p.log})")
            elif p.out.get("path") != "direct" or p.strategy != self.expected.value:
                out.append(f"{name} #{i}: path {p.out.get('path')} strategy {p.strategy}, "
                           f"expected direct {self.expected.value} (log {p.log})")
        return out


class World:
    """The lab, its public DHT nodes, and servers / client hosts made on first use."""

    def __init__(self, lab: Lab, tmp: Path) -> None:
        self.lab = lab
        self.tmp = tmp
        self.procs: list[Proc] = []
        self.public: list[LabHost] = []
        self.public6: list[LabHost] = []
        self.servers: dict[str, tuple[LabHost, Proc, str]] = {}
        self.client_hosts: dict[str, LabHost] = {}
        self._n = 0

    @property
    def bootstrap(self) -> str:
        return self.seed(self.public)

    def start_public(self, n: int = PUBLIC_NODES, *, ipv6: bool = False) -> list[LabHost]:
        """``n`` public DHT nodes on open hosts, IPv4 (``self.public``) or, with ``ipv6``, an
        IPv6 network of their own (``self.public6``): a node serves one family, the one of
        its ``--public-host``."""
        nodes = self.public6 if ipv6 else self.public
        for i in range(n):
            h = self.lab.host(f"pub{'6' if ipv6 else ''}{i}", kind="open", ipv6=ipv6)
            public = h.ip6 if ipv6 else h.ip
            assert public
            args = ["run", "--bootstrap-node", "--public-host", public, "--port", str(PORT),
                    "--state-dir", str(self.tmp / h.name),
                    "--log-format", "json", "--log-level", "info"]
            if nodes:
                args += ["--bootstrap", self.seed(nodes)]
            (self.tmp / h.name).mkdir(parents=True, exist_ok=True)
            self.procs.append(Proc(h.ns, self.tmp / f"{h.name}.log", args))
            nodes.append(h)
        # Every node knows every other before anyone connects (a lookup then touches all).
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if all(self._table_size(h) >= n - 1 for h in nodes):
                return nodes
            time.sleep(0.2)
        raise AssertionError("the public DHT nodes did not find each other")

    @staticmethod
    def seed(nodes: list[LabHost]) -> str:
        h = nodes[0]
        return f"[{h.ip6}]:{PORT}" if h.ip6 and h.name.startswith("pub6") else f"{h.ip}:{PORT}"

    def _table_size(self, h: LabHost) -> int:
        try:
            res = asyncio.run(control.request(self.tmp / h.name / "control.sock", "nodes",
                                              timeout=5))
        except (control.ControlError, OSError):
            return 0
        return len(res["nodes"])

    def listen(self, host: LabHost, tag: str, bootstrap: str | None = None
               ) -> tuple[Proc, str]:
        state = self.tmp / f"srv-{tag}"
        state.mkdir(parents=True, exist_ok=True)
        p = Proc(host.ns, self.tmp / f"srv-{tag}.log",
                 ["listen", "--echo", "--json", "--bootstrap", bootstrap or self.bootstrap,
                  "--state-dir", str(state), "--log-format", "json", "--log-level", "info"])
        self.procs.append(p)
        first = p.read_json(LISTEN_TIMEOUT)
        assert first.get("ok") and first.get("listening"), first
        return p, str(first["public_key"])

    def server(self, kind: str) -> tuple[LabHost, Proc, str]:
        if kind not in self.servers:
            host = self.lab.host(f"s-{kind}", kind=kind)
            p, key = self.listen(host, kind)
            self.servers[kind] = (host, p, key)
        return self.servers[kind]

    def client_host(self, kind: str) -> LabHost:
        if kind not in self.client_hosts:
            self.client_hosts[kind] = self.lab.host(f"c-{kind}", kind=kind)
        return self.client_hosts[kind]

    def ping(self, host: LabHost, key: str, *extra: str, bootstrap: str | None = None) -> Ping:
        self._n += 1
        log = self.tmp / f"ping-{self._n:03d}-{host.name}.log"
        t0 = time.monotonic()
        try:
            out = subprocess.run(
                dhtnode(host.ns, "ping", key, "--bootstrap", bootstrap or self.bootstrap,
                        "--json", "--log-format", "json", "--log-level", "info", *extra),
                capture_output=True, text=True, timeout=PING_TIMEOUT, cwd=ROOT)
        except subprocess.TimeoutExpired as exc:  # run() has killed it
            err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
            log.write_text(err)
            return Ping(False, PING_TIMEOUT, {"ok": False, "error": "timeout",
                                              "message": f"still running after {PING_TIMEOUT}s"},
                        log)
        elapsed = time.monotonic() - t0
        log.write_text(out.stderr)
        lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
        try:
            res = dict(json.loads(lines[-1]))
        except (IndexError, ValueError):
            res = {"ok": False, "error": "no_output", "message": out.stdout[-300:],
                   "exit": out.returncode}
        ok = bool(res.get("ok")) and out.returncode == 0
        return Ping(ok, elapsed, res, log)

    def close(self) -> None:
        for p in self.procs:
            p.stop()
        self.procs.clear()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with running_lab() as lab:
        w = World(lab, tmp_path_factory.mktemp("connect-matrix"))
        try:
            w.start_public()
            yield w
        finally:
            w.close()


def format_matrix(results: dict[tuple[str, str], Cell]) -> str:
    servers = [k for k in KINDS if any(s == k for s, _ in results)]
    clients = [k for k in KINDS if any(c == k for _, c in results)]
    cells = {key: c.summary() for key, c in results.items()}
    width = max([len(v) for v in cells.values()] + [len(k) for k in clients] + [4]) + 2
    head = "server \\ client".ljust(18) + "".join(k.ljust(width) for k in clients)
    rows = [LEGEND, head]
    for s in servers:
        rows.append(s.ljust(18) + "".join(
            cells.get((s, c), "").ljust(width) for c in clients))
    ok = sum(c.successes for c in results.values())
    want = sum(len(c.pings) for c in results.values())
    relayed = sum(p.ok and p.out.get("path") == "relayed"
                  for c in results.values() for p in c.pings)
    rows.append(f"connects ok: {ok}/{want}; ended relayed: {relayed}")
    return "\n".join(rows)


def test_connect_matrix(world: World, tmp_path: Path) -> None:
    t0 = time.monotonic()
    results: dict[tuple[str, str], Cell] = {}
    try:
        # Group by server so each listener is used by all its clients, then stopped.
        order = sorted(cells(), key=lambda sc: (KINDS.index(sc[0]), KINDS.index(sc[1])))
        for s_kind, c_kind in order:
            _, _, key = world.server(s_kind)
            client = world.client_host(c_kind)
            cell = results[(s_kind, c_kind)] = Cell(s_kind, c_kind,
                                                    expected_strategy(s_kind, c_kind))
            for _ in range(PINGS):
                cell.pings.append(world.ping(client, key))
    finally:
        table = format_matrix(results)
        text = f"{table}\nruntime {time.monotonic() - t0:.1f}s (lab and public nodes apart)\n"
        (tmp_path / "connect-matrix.txt").write_text(text)
        (world.tmp / "connect-matrix.txt").write_text(text)
        print("\n" + text)
    problems = [p for c in results.values() for p in c.problems()]
    assert not problems, "\n".join(problems)


def test_two_hosts_behind_one_nat_connect_over_the_lan(world: World) -> None:
    router = world.lab.nat_router("same-r", kind="port-restricted")
    a = world.lab.host_behind(router, "same-a")
    b = world.lab.host_behind(router, "same-b")
    _, key = world.listen(a, "same")
    pings = [world.ping(b, key) for _ in range(PINGS)]
    print("\nsame NAT:", [(p.ok, p.strategy, p.out.get("connect_ms"), p.out.get("address"))
                          for p in pings])
    for p in pings:
        assert p.ok, f"{p.out} (log {p.log})"
        assert p.out["path"] == "direct"
        # Over the LAN: the router does not hairpin, so only a.ip can work.
        assert str(p.out["address"]).startswith(f"{a.ip}:"), p.out


def test_firewalled_ipv6_pair_connects(world: World) -> None:
    """The lab's firewalled IPv6 pair (dual-stack hosts), joined through a DHT of IPv6 nodes:
    the DHT, the introduction, the punch and QUIC all run over IPv6."""
    if not world.public6:
        world.start_public(3, ipv6=True)
    a = world.lab.host("v6a", kind="firewalled", ipv6=True)
    b = world.lab.host("v6b", kind="firewalled", ipv6=True)
    boot6 = world.seed(world.public6)
    _, key = world.listen(a, "v6", bootstrap=boot6)
    pings = [world.ping(b, key, bootstrap=boot6) for _ in range(PINGS)]
    print("\nfirewalled IPv6 pair:", [(p.ok, p.strategy, p.out.get("connect_ms"),
                                       p.out.get("address")) for p in pings])
    for p in pings:
        assert p.ok, f"{p.out} (log {p.log})"
        assert p.out["path"] == "direct"
        assert p.strategy == Strategy.SIMULTANEOUS.value
        assert str(p.out["address"]).startswith(f"[{a.ip6}]:"), p.out


def _drop_ipv4_between(a: LabHost, b: LabHost) -> None:
    """Make IPv4 between two public hosts impossible (both directions, at ``a``), so only
    IPv6 can connect them."""
    rules = (f"table ip lab_noway {{\n"
             f"  chain i {{ type filter hook input priority -10; ip saddr {b.ip} drop; }}\n"
             f"  chain o {{ type filter hook output priority -10; ip daddr {b.ip} drop; }}\n"
             f"}}\n")
    sh("nft", "-f", "-", ns=a.ns, input=rules)


def test_dual_stack_pair_races_ipv6_beside_an_ipv4_introduction(world: World) -> None:
    """Dual-stack firewalled hosts whose DHT runs over IPv4 only: each tells the other its
    own IPv6 address inside the sealed introduction, and the punch races IPv6 beside IPv4.
    With IPv4 between the two blocked, only the IPv6 race can connect them."""
    a = world.lab.host("ds-a", kind="firewalled", ipv6=True)
    b = world.lab.host("ds-b", kind="firewalled", ipv6=True)
    _drop_ipv4_between(a, b)
    _, key = world.listen(a, "dual-stack")
    pings = [world.ping(b, key) for _ in range(PINGS)]
    print("\ndual-stack pair, IPv4 blocked:", [(p.ok, p.strategy, p.out.get("connect_ms"),
                                                p.out.get("address")) for p in pings])
    for p in pings:
        assert p.ok, f"{p.out} (log {p.log})"
        assert p.out["path"] == "direct"
        assert str(p.out["address"]).startswith(f"[{a.ip6}]:"), p.out


def test_symmetric_nats_with_ipv6_connect_directly_over_ipv6(world: World) -> None:
    """Both sides behind port-randomizing IPv4 NATs (no IPv4 punch can work) but with routed,
    firewalled IPv6, as most home routers give: the DHT and the introduction run over IPv4,
    and the connection ends direct over IPv6 instead of relayed."""
    ra = world.lab.nat_router("dsn-ra", kind="symmetric")
    rb = world.lab.nat_router("dsn-rb", kind="symmetric")
    a = world.lab.host_behind(ra, "dsn-a", ipv6=True)
    b = world.lab.host_behind(rb, "dsn-b", ipv6=True)
    _, key = world.listen(a, "dual-stack-nat")
    pings = [world.ping(b, key) for _ in range(PINGS)]
    print("\nsymmetric x symmetric with IPv6:", [(p.ok, p.strategy, p.out.get("connect_ms"),
                                                  p.out.get("path"), p.out.get("address"))
                                                 for p in pings])
    for p in pings:
        assert p.ok, f"{p.out} (log {p.log})"
        assert p.out["path"] == "direct", p.out
        assert p.strategy == Strategy.SIMULTANEOUS.value
        assert str(p.out["address"]).startswith(f"[{a.ip6}]:"), p.out
