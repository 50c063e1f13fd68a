"""Measuring a lab host's NAT behaviour from outside, with real UDP sockets (RFC 4787 terms).

This module owns:

- the probe agent: a small UDP socket server run inside a namespace as
  ``ip netns exec NS python -m tests.natprobe agent`` (cwd the checkout), driven by one JSON
  line per command on stdin, one JSON line per answer on stdout. It lives at most
  ``--lifetime`` seconds and waits at most 5 s per command;
- :class:`Agent`, the driving side of one agent process;
- :class:`Observatory`: observers A (three ports) and B (two ports) and an unrelated stranger,
  public hosts on the lab's internet, and :meth:`Observatory.measure` ->
  :class:`NatBehaviour` (mapping, filtering, port behaviour);
- :data:`EXPECTED`, what each lab kind must measure as, and :func:`problems`.

``python -m tests.natprobe table`` builds a lab with every kind and prints what it measures.

How it measures. Mapping: one inside socket sends to A:a1, A:a2, B:b1, A:a3, B:b2, one at a
time, and each observer reports the source it saw: the same for all -> endpoint-independent;
the same towards one address only -> address-dependent; else address-and-port-dependent. The
differences between the ports tell preserved / sequential (a constant small step) / random.
Filtering: a fresh inside socket sends to A:a1 only; then A:a2, B:b2 and the stranger send to
its mapped address, and A:a1 answers as the control that the path works. What gets in tells
endpoint-independent / address-dependent / address-and-port-dependent filtering.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.netlab import KINDS, Lab, LabHost

ROOT = Path(__file__).resolve().parent.parent

EI = "endpoint-independent"
AD = "address-dependent"
APD = "address-and-port-dependent"

MAX_WAIT = 5.0  # longest an agent waits for packets in one command
CALL_TIMEOUT = 10.0  # longest the driver waits for an agent's answer
SETTLE = 0.5  # how long to wait for packets that a filter may have dropped


# --- the agent (runs inside a namespace) -----------------------------------------------------


def _agent(lifetime: float) -> None:
    # A hard bound on the agent's life, whatever its driver does.
    signal.signal(signal.SIGALRM, lambda *_: os._exit(3))
    signal.alarm(max(1, int(lifetime)))
    socks: dict[int, socket.socket] = {}
    out = sys.stdout
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        res: dict[str, Any] = {}
        try:
            if op == "bind":
                fam = socket.AF_INET6 if cmd.get("family") == 6 else socket.AF_INET
                s = socket.socket(fam, socket.SOCK_DGRAM)
                if fam == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", cmd.get("port", 0)))
                socks[s.fileno()] = s
                res = {"sock": s.fileno(), "port": s.getsockname()[1]}
            elif op == "send":
                s = socks[cmd["sock"]]
                ttl = cmd.get("ttl")
                v6 = s.family == socket.AF_INET6
                level, opt = ((socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS) if v6
                              else (socket.IPPROTO_IP, socket.IP_TTL))
                if ttl is not None:
                    s.setsockopt(level, opt, ttl)
                for _ in range(cmd.get("count", 1)):
                    s.sendto(cmd["data"].encode(), (cmd["to"][0], cmd["to"][1]))
                if ttl is not None:
                    s.setsockopt(level, opt, 64)
            elif op == "recv":
                s = socks[cmd["sock"]]
                want = set(cmd.get("want", []))
                deadline = time.monotonic() + min(float(cmd.get("timeout", 1.0)), MAX_WAIT)
                packets: list[list[Any]] = []
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0 or not select.select([s], [], [], left)[0]:
                        break
                    data, src = s.recvfrom(2048)
                    packets.append([data.decode(errors="replace"), src[0], src[1]])
                    want.discard(packets[-1][0])
                    if not want and cmd.get("want"):
                        break
                res = {"packets": packets}
            elif op == "close":
                socks.pop(cmd["sock"]).close()
            elif op == "exit":
                break
            else:
                res = {"error": f"unknown op {op!r}"}
        except (OSError, KeyError, ValueError) as exc:
            res = {"error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(res) + "\n")
        out.flush()


# --- the driver ------------------------------------------------------------------------------


class AgentError(RuntimeError):
    pass


class Agent:
    """One probe agent process inside namespace ``ns``."""

    def __init__(self, ns: str, *, lifetime: float = 300.0) -> None:
        self.ns = ns
        self.p = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "tests.natprobe", "agent",
             "--lifetime", str(lifetime)],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self._buf = b""

    def call(self, op: str, **kw: Any) -> dict[str, Any]:
        assert self.p.stdin is not None and self.p.stdout is not None
        try:
            self.p.stdin.write((json.dumps({"op": op, **kw}) + "\n").encode())
            self.p.stdin.flush()
        except BrokenPipeError:
            raise AgentError(f"agent in {self.ns} is gone: {self._stderr()}") from None
        fd = self.p.stdout.fileno()
        deadline = time.monotonic() + CALL_TIMEOUT
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise AgentError(f"agent in {self.ns} did not answer {op}")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AgentError(f"agent in {self.ns} exited: {self._stderr()}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        res: dict[str, Any] = json.loads(line)
        if "error" in res:
            raise AgentError(f"agent in {self.ns}: {op}: {res['error']}")
        return res

    def _stderr(self) -> str:
        if self.p.poll() is None or self.p.stderr is None:
            return ""
        return self.p.stderr.read().decode(errors="replace")[-500:]

    # Conveniences over call().

    def bind(self, family: int = 4) -> tuple[int, int]:
        """A new UDP socket; returns (socket id, local port)."""
        res = self.call("bind", family=family)
        return res["sock"], res["port"]

    def send(self, sock: int, to: tuple[str, int], data: str, *, count: int = 1,
             ttl: int | None = None) -> None:
        self.call("send", sock=sock, to=list(to), data=data, count=count, ttl=ttl)

    def recv(self, sock: int, want: list[str], timeout: float) -> dict[str, tuple[str, int]]:
        """Waits until every token in ``want`` arrived or ``timeout``; returns token -> the
        source it came from, for the tokens of ``want`` that arrived."""
        got = self.call("recv", sock=sock, want=want, timeout=timeout)["packets"]
        return {data: (ip, port) for data, ip, port in got if data in want}

    def close(self) -> None:
        if self.p.poll() is None:
            try:
                self.call("exit")
            except (AgentError, OSError):
                pass
            try:
                self.p.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        for f in (self.p.stdin, self.p.stdout, self.p.stderr):
            if f is not None:
                f.close()


def token(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:8]}"


# --- measuring -------------------------------------------------------------------------------


@dataclass(frozen=True)
class NatBehaviour:
    """What a host looks like from the internet (RFC 4787 terms)."""

    translated: bool  # the internet sees another address or port than the host's own
    public_ip: str
    mapping: str  # EI, AD or APD
    filtering: str  # EI, AD or APD ("inconsistent" if strangers and B disagree)
    port: str  # "preserved", "changed" (one port, not the host's), "sequential", "random"
    port_step: int | None  # the constant difference between mapped ports; None if random
    local_port: int
    ports: tuple[int, ...]  # the mapped ports of the mapping probes, in order

    def row(self) -> str:
        step = "" if self.port_step in (None, 0) else f" step {self.port_step:+d}"
        nat = "translated" if self.translated else "not translated"
        return (f"{nat:<14}  mapping {self.mapping:<26}  filtering {self.filtering:<26}  "
                f"ports {self.port}{step} {list(self.ports)} (local {self.local_port})")


@dataclass(frozen=True)
class Expected:
    translated: bool
    mapping: str
    filtering: str
    port: str
    port_step: int | None = None  # checked only if set


EXPECTED: dict[str, Expected] = {
    "open": Expected(False, EI, EI, "preserved", 0),
    "firewalled": Expected(False, EI, APD, "preserved", 0),
    "full-cone": Expected(True, EI, EI, "preserved", 0),
    "restricted": Expected(True, EI, AD, "preserved", 0),
    "port-restricted": Expected(True, EI, APD, "preserved", 0),
    "symmetric": Expected(True, APD, APD, "random"),
    "sequential": Expected(True, APD, APD, "sequential", 1),
    "cgnat": Expected(True, EI, APD, "preserved", 0),
}
assert set(EXPECTED) == set(KINDS)


def problems(kind: str, b: NatBehaviour) -> list[str]:
    """How ``b`` differs from what a ``kind`` host must measure as; empty if it matches."""
    e = EXPECTED[kind]
    out = []
    for name in ("translated", "mapping", "filtering", "port", "port_step"):
        want, got = getattr(e, name), getattr(b, name)
        if want is not None and want != got:
            out.append(f"{name}: expected {want}, measured {got}")
    return out


def classify_ports(ports: list[int], local_port: int) -> tuple[str, int | None]:
    if len(set(ports)) == 1:
        return ("preserved" if ports[0] == local_port else "changed"), 0
    steps = {b - a for a, b in itertools.pairwise(ports)}
    if len(steps) == 1 and 0 < abs(step := steps.pop()) <= 16:
        return "sequential", step
    return "random", None


class Observatory:
    """Public observers on ``lab``'s internet, and the agents of the hosts it has measured.

    A and B observe (with IPv6 addresses too), the stranger is a host the measured one never
    talks to. Close it (or use it as a context manager) to stop every agent."""

    def __init__(self, lab: Lab, *, name: str = "obs", lifetime: float = 300.0) -> None:
        self.lab = lab
        self.lifetime = lifetime  # each agent's hard limit, in seconds
        self._agents: dict[str, Agent] = {}
        self.a = lab.host(f"{name}-a", ipv6=True)
        self.b = lab.host(f"{name}-b", ipv6=True)
        self.stranger = lab.host(f"{name}-x", ipv6=True)
        self._socks: dict[tuple[str, int], list[tuple[int, int]]] = {}

    def __enter__(self) -> Observatory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def agent(self, host: LabHost) -> Agent:
        if host.ns not in self._agents:
            self._agents[host.ns] = Agent(host.ns, lifetime=self.lifetime)
        return self._agents[host.ns]

    def close(self) -> None:
        for a in self._agents.values():
            a.close()
        self._agents.clear()

    def _observer_socks(self, host: LabHost, family: int, n: int) -> list[tuple[int, int]]:
        key = (host.ns, family)
        if key not in self._socks:
            self._socks[key] = [self.agent(host).bind(family) for _ in range(n)]
        return self._socks[key]

    @staticmethod
    def _addr(host: LabHost, family: int) -> str:
        if family == 6:
            if host.ip6 is None:
                raise ValueError(f"{host.name} has no IPv6 address")
            return host.ip6
        return host.ip

    def measure(self, host: LabHost, *, family: int = 4) -> NatBehaviour:
        """Measure ``host`` from outside: its mapping, filtering and port behaviour."""
        ag = self.agent(host)
        a_socks = self._observer_socks(self.a, family, 3)
        b_socks = self._observer_socks(self.b, family, 2)
        (x_sock, _), = self._observer_socks(self.stranger, family, 1)
        a_ip, b_ip = self._addr(self.a, family), self._addr(self.b, family)
        a, b, x = self.agent(self.a), self.agent(self.b), self.agent(self.stranger)

        # Mapping: one socket, five destinations, one at a time so that a sequential NAT's
        # ports come in the order of the probes.
        s1, lp1 = ag.bind(family)
        seen: list[tuple[str, int]] = []
        targets = [(a, a_ip, a_socks[0]), (a, a_ip, a_socks[1]), (b, b_ip, b_socks[0]),
                   (a, a_ip, a_socks[2]), (b, b_ip, b_socks[1])]
        for obs, ip, (sock, oport) in targets:
            seen.append(self._outbound(ag, s1, obs, sock, (ip, oport)))
        ag.call("close", sock=s1)
        if seen[0] == seen[1] == seen[2]:
            mapping = EI
        elif seen[0] == seen[1]:
            mapping = AD
        else:
            mapping = APD
        ports = [p for _, p in seen]
        port, step = classify_ports(ports, lp1)

        # Filtering: a fresh socket that has sent to A:a1 and nothing else.
        s2, lp2 = ag.bind(family)
        mapped = self._outbound(ag, s2, a, a_socks[0][0], (a_ip, a_socks[0][1]))
        tok = {k: token(k) for k in ("a-other-port", "b", "stranger", "control")}
        a.send(a_socks[1][0], mapped, tok["a-other-port"], count=2)
        b.send(b_socks[1][0], mapped, tok["b"], count=2)
        x.send(x_sock, mapped, tok["stranger"], count=2)
        a.send(a_socks[0][0], mapped, tok["control"], count=2)
        got = ag.recv(s2, list(tok.values()), SETTLE)
        ag.call("close", sock=s2)
        if tok["control"] not in got:
            raise AgentError(f"{host.name}: no answer from A:a1 came back to {mapped}")
        in_a, in_b, in_x = (tok[k] in got for k in ("a-other-port", "b", "stranger"))
        if in_b != in_x or (in_b and not in_a):
            filtering = "inconsistent"
        elif in_b:
            filtering = EI
        elif in_a:
            filtering = AD
        else:
            filtering = APD
        own = self._addr(host, family)
        return NatBehaviour(
            translated=any(s != (own, lp1) for s in seen) or mapped != (own, lp2),
            public_ip=seen[0][0], mapping=mapping, filtering=filtering, port=port,
            port_step=step, local_port=lp1, ports=tuple(ports))

    @staticmethod
    def _outbound(ag: Agent, sock: int, obs: Agent, obs_sock: int,
                  to: tuple[str, int]) -> tuple[str, int]:
        """Send from the inside socket to an observer; returns the source the observer saw."""
        for _ in range(3):
            tk = token("map")
            ag.send(sock, to, tk)
            got = obs.recv(obs_sock, [tk], 1.0)
            if tk in got:
                return got[tk]
        raise AgentError(f"nothing from {ag.ns} reached {to[0]}:{to[1]}")


def measure(obs: Observatory, host: LabHost, *, family: int = 4) -> NatBehaviour:
    return obs.measure(host, family=family)


def format_table(rows: dict[str, NatBehaviour]) -> str:
    return "\n".join(f"{kind:<16} {b.row()}" for kind, b in rows.items())


def _table() -> None:
    lab = Lab()
    try:
        lab.start()
        with Observatory(lab) as obs:
            rows = {k: obs.measure(lab.host(k, kind=k)) for k in KINDS}
            print(format_table(rows))
    finally:
        lab.close()


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m tests.natprobe")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ag = sub.add_parser("agent", help="serve probe commands on stdin (inside a namespace)")
    ag.add_argument("--lifetime", type=float, default=300.0)
    sub.add_parser("table", help="build a lab with every kind and print what it measures")
    args = ap.parse_args()
    if args.cmd == "agent":
        _agent(args.lifetime)
    else:
        _table()


if __name__ == "__main__":
    main()
